"""Step hooks: record every spec step's outputs by step id, and emulate a precision profile.

Pass a :class:`Trace` to a forward function to record what each step produced; tests
check every recorded array against the step's declared symbolic shape, and golden cases
store them. ``Trace(precision="bf16")`` also rounds every float step output the way that
profile of spec/tolerance.yaml stores it, so the forward becomes the emulation of a bf16
implementation. A trace turns query chunking off so each step is seen once, whole.
"""

from __future__ import annotations

import functools

import numpy as np

from .config import ModelConfig
from .errors import InputError
from .fp8 import BLOCK_SIZE, Fp8Linear
from .precision import ROUNDING
from .spec import load_spec_file, step_by_id


class Trace:
    """``trace[step_id][name]`` is the array that step ``step_id`` produced under ``name``.

    ``precision``: a profile of spec/tolerance.yaml to emulate (None: exact float64).
    ``keep``: whether to keep the arrays (False for an emulation that only needs the result).
    """

    def __init__(self, precision: str | None = None, keep: bool = True) -> None:
        self.steps: dict[str, dict[str, np.ndarray]] = {}
        self.precision = precision
        self.keep = keep
        self.profile = profile(precision) if precision is not None else None

    @property
    def arithmetic(self) -> np.dtype:
        """The dtype this trace's emulation computes in (:func:`arithmetic`)."""
        return arithmetic(self.precision)

    @property
    def rope_table(self) -> np.dtype:
        """The dtype this trace's emulation builds the RoPE table in (:func:`rope_table`)."""
        return rope_table(self.precision)

    @property
    def indexer_fp8(self) -> bool:
        """DSA.6 — whether this trace's profile quantises the indexer's q and k to FP8 (``indexer_fp8: true``, the fp8 profile)."""
        return self.profile is not None and bool(self.profile.get("indexer_fp8", False))

    def latent_cache_fp8(self, config: ModelConfig) -> bool:
        """FP8.12 — whether this trace's profile holds ``config``'s MLA latent cache as FP8 records (``latent_cache_fp8: true``,
        the fp8 profile): on a DSA config (V3.2) whose kv_lora_rank is a whole number of 128-wide tiles."""
        return (self.profile is not None and bool(self.profile.get("latent_cache_fp8", False)) and config.sparse_attention
                and config.kv_lora_rank % BLOCK_SIZE == 0)

    def round(self, step_id: str, name: str, value: np.ndarray) -> np.ndarray:
        """TOLERANCE.2 — ``value`` as the profile stores output ``name`` of ``step_id`` (integers and bools untouched)."""
        if self.profile is None or np.asarray(value).dtype.kind != "f":
            return value
        return ROUNDING[storage_format(self.precision, step_id, name)](value).astype(np.asarray(value).dtype, copy=False)

    def round_input(self, value: np.ndarray, kind: str = "inputs") -> np.ndarray:
        """A weight (``kind="weights"``) or float input as the profile stores it."""
        if self.profile is None or np.asarray(value).dtype.kind != "f":
            return value
        fmt = self.profile.get(kind, self.profile["storage"])
        return ROUNDING[fmt](value).astype(np.asarray(value).dtype, copy=False)

    def weight(self, value: np.ndarray, fp8: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | Fp8Linear:
        """FP8.13 — a weight as the profile holds it: a tensor of an FP8 checkpoint (``fp8`` = its codes and
        weight_scale_inv) stays FP8 (an :class:`Fp8Linear`) under a profile with ``fp8_linear``; any other is rounded as
        :meth:`round_input` rounds weights."""
        options = None if self.profile is None else self.profile.get("fp8_linear")
        if fp8 is None or options is None:
            return self.round_input(value, "weights")
        return Fp8Linear(*fp8, gemm_impl=options["gemm_impl"], scale_fmt=options["scale_fmt"], act_variant=options["act_quant"])

    def record(self, step_id: str, **arrays: np.ndarray) -> None:
        """Store the named outputs of one step (a later call for the same step adds names)."""
        self.steps.setdefault(step_id, {}).update({name: np.asarray(value) for name, value in arrays.items()})

    def __getitem__(self, step_id: str) -> dict[str, np.ndarray]:
        return self.steps[step_id]

    def __contains__(self, step_id: str) -> bool:
        return step_id in self.steps


def record(trace: Trace | None, step_id: str, **arrays: np.ndarray) -> None:
    """Record into ``trace`` if one is given and keeps arrays (for outputs that are not rounded: see :func:`emit`)."""
    if trace is not None and trace.keep:
        trace.record(step_id, **arrays)


@functools.lru_cache(maxsize=None)
def output_names(step_id: str) -> tuple[str, ...]:
    """The output names of a step, in the order the spec declares them."""
    return tuple(step_by_id(step_id)["outputs"])


@functools.lru_cache(maxsize=None)
def profile(name: str) -> dict:
    """A precision profile (or a calibration variant) of spec/tolerance.yaml."""
    spec = load_spec_file("tolerance.yaml")
    profiles = {**{k: v for k, v in spec.get("calibration_variants", {}).items() if k != "doc"}, **spec["profiles"]}
    if name not in profiles:
        raise InputError("precision", f"unknown profile {name!r}; expected one of {sorted(spec['profiles'])}", "TOLERANCE.2")
    return profiles[name]


def arithmetic(precision: str | None) -> np.dtype:
    """TOLERANCE.2 — the dtype a profile's emulation computes in: float32 with ``arithmetic: fp32``, else (and exact) float64."""
    fp32 = precision is not None and profile(precision).get("arithmetic") == "fp32"
    return np.dtype(np.float32 if fp32 else np.float64)


def rope_table(precision: str | None) -> np.dtype:
    """TOLERANCE.2 — the dtype a profile's emulation builds the RoPE table in: float32 with ``rope_table: fp32`` (as engines
    build it), else (and exact) float64."""
    table = "fp64" if precision is None else profile(precision).get("rope_table", "fp64")
    if table not in ("fp32", "fp64"):
        raise InputError(f"{precision}.rope_table", f"expected fp32 or fp64, got {table!r}", "TOLERANCE.2")
    return np.dtype(np.float32 if table == "fp32" else np.float64)


def storage_format(precision: str, step_id: str, name: str) -> str:
    """TOLERANCE.2 — the format a profile stores output ``name`` of ``step_id`` in (overrides, else ``storage``)."""
    declared = profile(precision)
    overrides = declared["overrides"]
    return overrides.get(f"{step_id}/{name}", overrides.get(step_id, declared["storage"]))


def emit(trace: Trace | None, step_id: str, *arrays: np.ndarray):
    """TOLERANCE.2 — pass one step's outputs through the trace: rounded per its profile, recorded under the spec's names.

    Returns the arrays (one array, or a tuple in the spec's output order); without a
    trace they come back unchanged.
    """
    if trace is None:
        return arrays[0] if len(arrays) == 1 else arrays
    names = output_names(step_id)
    if len(names) != len(arrays):
        raise InputError(step_id, f"expected {len(names)} outputs {list(names)}, got {len(arrays)}", "TOLERANCE.2")
    passed = tuple(trace.round(step_id, name, value) for name, value in zip(names, arrays))
    if trace.keep:
        trace.record(step_id, **dict(zip(names, passed)))
    return passed[0] if len(passed) == 1 else passed
