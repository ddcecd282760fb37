"""The conformance checker: run an adapter on the golden cases and say what is right and which step is wrong.

One engine behind three ways in: ``mla-ref check ADAPTER``, ``pytest --pyargs
mla_ref.conformance`` (adapter named by ``MLA_REF_ADAPTER``) and :func:`check`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import GoldenError, InputError, Unsupported
from ..golden.cases import stored_recipe_weights
from ..golden.generate import default_golden_dir
from ..golden.manifest import read_manifest
from ..golden.storage import read_npz
from ..spec import load_spec_file
from ..trace import storage_format
from .compare import Comparison, compare_tensor
from .protocol import call, entry_points
from .diagnose import diagnose

@dataclasses.dataclass
class CaseResult:
    """The verdict on one case: ``status`` is pass, fail, skip, waived, xpass (a waived case that passed: a failure)
    or unsupported (the adapter raised :class:`mla_ref.Unsupported`: neither a pass nor a failure).

    ``extension``: why no released model's config can express the case (spec/golden.yaml), "" for a released-model config.
    """

    case_id: str
    entry_point: str
    level: str
    status: str
    reason: str = ""
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    first_divergent_step: str | None = None
    diagnosis: list[str] = dataclasses.field(default_factory=list)
    repro: str = ""
    seconds: float = 0.0
    extension: str = ""

    @property
    def used(self) -> float:
        """The largest share of the allowed error any compared tensor used.

        inf for a failed case whose L2 errors stayed within the allowance (an exact check failed:
        ids, NaN / inf positions, a shape, a crash), so a failure never reads as headroom.
        """
        used = max((c.used for c in self.comparisons if c.used is not None), default=0.0)
        return math.inf if self.status == "fail" and not used > 1 else used

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["used"] = self.used
        return data


# the summary's counts: verdict -> the case statuses it counts (a waived case that passed is a failure)
VERDICTS = {"passed": ("pass",), "failed": ("fail", "xpass"), "skipped": ("skip",), "waived": ("waived",), "unsupported": ("unsupported",)}


@dataclasses.dataclass
class Report:
    """All case results of one run, with the summary counts."""

    adapter: str
    profile: str
    cases: list[CaseResult]

    def count(self, status: str) -> int:
        return sum(1 for case in self.cases if case.status == status)

    @property
    def failed(self) -> list[str]:
        return [case.case_id for case in self.cases if case.status in VERDICTS["failed"]]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self, extension: bool | None = None) -> dict[str, int]:
        """Cases by verdict; ``extension`` True / False: only the extension / released-model cases."""
        cases = [case for case in self.cases if extension is None or bool(case.extension) == extension]
        return {verdict: sum(case.status in statuses for case in cases) for verdict, statuses in VERDICTS.items()}

    def summary(self) -> str:
        line = ", ".join(f"{number} {verdict}" for verdict, number in self.counts().items())
        if any(case.extension for case in self.cases):
            released, extension = self.counts(extension=False), self.counts(extension=True)
            line += (f" (released-model configs: {released['passed']} passed, {released['failed']} failed, {released['unsupported']} unsupported;"
                     f" extensions: {extension['passed']} passed, {extension['failed']} failed, {extension['unsupported']} unsupported)")
        return f"{line} ({self.adapter}, profile {self.profile})"

    def to_json(self) -> str:
        return json.dumps({"adapter": self.adapter, "profile": self.profile, "summary": self.summary(), **self.counts(),
                           "released_model_configs": self.counts(extension=False), "extensions": self.counts(extension=True),
                           "cases": [case.to_dict() for case in self.cases]},
                          indent=1, default=_json_default)

    def table(self) -> str:
        lines = [f"{'case':58s} {'status':7s} {'used':>8s}  detail"]
        for case in self.cases:
            used = "" if case.status in ("skip", "unsupported") else f"{100 * case.used:7.1f}%" if math.isfinite(case.used) else "    inf"
            detail = case.reason
            if case.extension:
                detail = f"[extension] {detail}"  # the why: the JSON report and spec/golden.yaml
            if case.first_divergent_step:
                detail = f"first divergent step {case.first_divergent_step}; {detail}"
            if case.diagnosis:
                detail += " | looks like: " + "; ".join(case.diagnosis)
            lines.append(f"{case.case_id:58s} {case.status:7s} {used:>8s}  {detail}")
            if case.status in ("fail", "xpass") and case.repro:
                lines.append(f"{'':58s}   repro: {case.repro}")
        lines.append(self.summary())
        return "\n".join(lines)


def _json_default(value: Any):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(type(value).__name__)


def load_adapter(name: str | Any):
    """An adapter from a module name (``examples.torch_adapter``), a ``.py`` path, ``module:attribute``, or an object."""
    if not isinstance(name, str):
        return name
    module_name, _, attribute = name.partition(":")
    try:
        if module_name.endswith(".py") or Path(module_name).is_file():
            path = Path(module_name)
            spec = importlib.util.spec_from_file_location(f"mla_ref_adapter_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the adapter's
        raise InputError("adapter", f"cannot import {name!r}: {type(error).__name__}: {error}", "GOLDEN.adapter") from None
    return getattr(module, attribute) if attribute else module


def _select(case_id: str, entry: dict, select: str | None, step: str | None, level: str | None) -> bool:
    if select and not (fnmatch.fnmatch(case_id, select) or select in case_id):
        return False
    if step and step not in entry["steps"]:
        return False
    return not level or entry["level"] == level


def check(adapter, profile: str | None = None, select: str | None = None, *, step: str | None = None,
          level: str | None = None, waivers: Mapping[str, str] | None = None, directory: Path | None = None,
          adapter_name: str | None = None) -> Report:
    """Run ``adapter`` on every selected golden case under ``profile`` (default: the adapter's PROFILE, else fp32)."""
    module = load_adapter(adapter)
    profile = profile or getattr(module, "PROFILE", None) or "fp32"
    profiles = load_spec_file("tolerance.yaml")["profiles"]
    if profile not in profiles:
        raise InputError("profile", f"unknown profile {profile!r}; expected one of {sorted(profiles)}", "TOLERANCE.2")
    directory = Path(directory or default_golden_dir())
    manifest = read_manifest(directory / "manifest.yaml")
    name = adapter_name or (adapter if isinstance(adapter, str) else getattr(module, "__name__", type(module).__name__))
    results = []
    for case_id, entry in manifest["cases"].items():
        if not _select(case_id, entry, select, step, level):
            continue
        result = run_case(module, directory, case_id, entry, profile, name)
        waiver = next((reason for pattern, reason in (waivers or {}).items() if fnmatch.fnmatch(case_id, pattern)), None)
        if waiver is not None:
            result.status = "waived" if result.status == "fail" else ("xpass" if result.status == "pass" else result.status)
            result.reason = f"waived: {waiver}" if result.status == "waived" else (f"unexpected pass of a waived case ({waiver})" if result.status == "xpass" else result.reason)
        results.append(result)
    return Report(name, profile, results)


def load_case(directory: Path, entry: dict) -> dict[str, dict[str, np.ndarray]]:
    """A case file split by kind: inputs, weights, outputs, steps ("MLA.2/q_nope"), emulated, acceptable.

    A model-level case stores the recipe of its weights instead of the weights: they are
    rebuilt here and checked against the manifest's digest.
    """
    tensors = read_npz(directory / entry["file"])
    parts: dict[str, dict[str, np.ndarray]] = {"input": {}, "weight": {}, "output": {}, "step": {}, "emulated": {}, "acceptable": {}}
    for name, value in tensors.items():
        kind, _, rest = name.partition(":")
        if kind == "step":
            rest = rest.replace(":", "/", 1)
        parts.setdefault(kind, {})[rest] = value
    if "weights" in entry:
        parts["weight"] = stored_recipe_weights(entry)
    return parts


def _call(module, entry: dict, case: dict) -> Mapping:
    """Call the adapter positionally, in the order of the protocol's signature, on copies of the inputs."""
    available = {name: np.array(value) for name, value in case["input"].items()}  # copies: an adapter may write into them
    available.update(entry["args"])
    available["config"] = dict(entry["config"])
    available["weights"] = {name: np.array(value) for name, value in case["weight"].items()}
    return call(getattr(module, entry["entry_point"]), entry["entry_point"], available)


def run_case(module, directory: Path, case_id: str, entry: dict, profile: str, adapter_name: str = "ADAPTER") -> CaseResult:
    """Run one case and compare every output (and every intermediate the adapter returns)."""
    started = time.perf_counter()
    result = CaseResult(case_id, entry["entry_point"], entry["level"], "pass",
                        repro=f"mla-ref check {adapter_name} --profile {profile} --select '{case_id}'", extension=entry.get("extension", ""))
    if not callable(getattr(module, entry["entry_point"], None)):
        result.status, result.reason = "skip", f"adapter has no entry point {entry['entry_point']}"
        return result
    try:
        case = load_case(directory, entry)
    except GoldenError as error:
        result.status, result.reason = "fail", f"golden case unreadable: {error}"
        return result
    noise = entry["profiles"].get(profile, {}).get("noise")
    noise_max = entry["profiles"].get(profile, {}).get("noise_max", {})
    if noise is None:
        result.status, result.reason = "skip", f"case has no {profile} profile"
        return result
    try:
        produced = _call(module, entry, case)
    except Unsupported as error:
        result.status, result.reason = "unsupported", error.reason
        return result
    except Exception as error:  # noqa: BLE001 - a broken adapter must not crash the checker
        result.status = "fail"
        result.reason = f"adapter raised {type(error).__name__}: {error}"
        result.diagnosis = [traceback.format_exception_only(type(error), error)[-1].strip()]
        return result
    if not isinstance(produced, Mapping):
        result.status, result.reason = "fail", f"adapter returned {type(produced).__name__}, expected a dict of arrays"
        return result
    outputs = entry_points()[entry["entry_point"]]["outputs"]
    missing = [name for name in outputs if name not in produced]
    if missing:
        result.status, result.reason = "fail", f"missing outputs {missing} (returned {sorted(produced)})"
        return result
    truth_outputs = dict(case["output"])
    produced = _align_expert_order(produced, truth_outputs, case["step"])
    forced = _teacher_forcing(entry, case, produced)
    if forced is not None:  # an acceptable near-tie choice: judge the output under the candidate's routing
        truth_outputs["weights" if entry["entry_point"] == "moe_route" else "output"] = forced
        truth_outputs["expert_ids"] = np.asarray(produced["expert_ids"])
    output_steps = entry_points()[entry["entry_point"]]["output_steps"]
    for name in [name for name in truth_outputs if name in produced]:
        fmt = storage_format(profile, output_steps[name], name)
        result.comparisons.append(compare_tensor(name, produced[name], truth_outputs[name], noise.get(f"output:{name}", 0.0), profile,
                                                 fmt=fmt, noise_max=noise_max.get(f"output:{name}", 0.0)))
    step_results = []
    for key, truth in case["step"].items():
        if key in produced and not (forced is not None and key.startswith("MOE.") and int(key.split("/")[0][4:]) >= 7):
            step, tensor = key.split("/")  # under teacher forcing only the outputs are judged past the routing choice
            truth, produced_value = _without_padding(entry, case, step, tensor, truth, produced[key])
            comparison = compare_tensor(key, produced_value, truth, noise.get(f"step:{step}:{tensor}", 0.0), profile,
                                        fmt=storage_format(profile, step, tensor), noise_max=noise_max.get(f"step:{step}:{tensor}", 0.0))
            result.comparisons.append(comparison)
            step_results.append((step, comparison))
    failures = [c for c in result.comparisons if not c.passed]
    if failures:
        result.status = "fail"
        result.reason = "; ".join(f"{c.name}: {c.reason}" for c in failures[:3])
        order = entry["steps"]
        diverged = [step for step, c in step_results if not c.passed]
        if not diverged:  # no intermediate returned, or none failing: blame the step that yields the failing output
            diverged = [output_steps[c.name] for c in failures if c.name in output_steps]
        ranked = [step for step in diverged if step in order]
        result.first_divergent_step = min(ranked, key=order.index) if ranked else (diverged[0] if diverged else None)
        result.diagnosis = diagnose(entry, case, produced, profile, failures)
    result.seconds = time.perf_counter() - started
    return result


def _without_padding(entry: dict, case: dict, step: str, tensor: str, truth: np.ndarray, candidate):
    """Intermediates at right-padded query positions are undefined (spec/mla.yaml conventions.padding): zero them on both sides.

    An entry point may declare its own ``padded_rows`` (spec/golden.yaml: mtp_draft pads its rows past n = prompt_lengths - 1).
    """
    from ..spec import parse_shape, step_by_id
    dims = parse_shape(step_by_id(step)["outputs"].get(tensor, "[]"))
    candidate = np.asarray(candidate)
    if candidate.shape != truth.shape or truth.dtype.kind != "f":
        return truth, candidate
    declared = entry_points()[entry["entry_point"]].get("padded_rows")
    if declared is not None and truth.ndim == 3:
        lengths, axis = np.asarray(case["input"][declared["lengths"]]) + declared["offset"], declared["axis"]
    else:
        lengths = case["input"].get("query_lengths")
        if lengths is None or "seq" not in dims or dims[0] not in ("batch", "tokens"):
            return truth, candidate
        axis = dims.index("seq")
    shape = [1] * truth.ndim
    shape[0], shape[axis] = truth.shape[0], truth.shape[axis]
    padded = (np.arange(truth.shape[axis])[None, :] >= np.asarray(lengths)[:, None]).reshape(shape)
    return np.where(padded, 0.0, truth), np.where(padded, 0.0, candidate.astype(np.float64))


def _align_expert_order(produced: Mapping, outputs: Mapping, steps: Mapping) -> dict:
    """Experts chosen as the truth chose them but listed in another order (near ties inside the top-k reorder
    under low precision) are reordered, with the weights aligned to them: the set and the weights are what count."""
    produced = dict(produced)
    for ids_name, weights_name in (("expert_ids", "weights"), ("MOE.7/expert_ids", "MOE.8/weights"), ("MOE.5/kept_groups", None)):
        truth = outputs.get(ids_name, steps.get(ids_name))
        if truth is None or ids_name not in produced:
            continue
        candidate = np.asarray(produced[ids_name])
        if candidate.shape != truth.shape or candidate.dtype.kind not in "iu" or np.array_equal(candidate, truth):
            continue
        if not np.array_equal(np.sort(candidate, axis=-1), np.sort(truth, axis=-1)):
            continue
        order = np.argsort(candidate, axis=-1, kind="stable")
        target = np.argsort(np.argsort(truth, axis=-1, kind="stable"), axis=-1, kind="stable")
        permutation = np.take_along_axis(order, target, axis=-1)  # candidate position of each truth slot
        produced[ids_name] = np.take_along_axis(candidate, permutation, axis=-1)
        if weights_name is not None and weights_name in produced and np.shape(produced[weights_name]) == truth.shape:
            produced[weights_name] = np.take_along_axis(np.asarray(produced[weights_name]), permutation, axis=-1)
    return produced


def _teacher_forcing(entry: dict, case: dict, produced: Mapping):
    """For a near-tie MoE case: the truth under the candidate's routing, when its choice is an acceptable one."""
    if "expert_ids" not in produced or "expert_ids" not in case["acceptable"]:
        return None
    candidate_ids = np.asarray(produced["expert_ids"])
    acceptable = case["acceptable"]["expert_ids"]  # [alternatives, tokens, k]
    if candidate_ids.shape != acceptable.shape[1:]:
        return None
    ok = np.any(np.all(np.sort(acceptable, axis=-1) == np.sort(candidate_ids, axis=-1)[None], axis=-1), axis=0)
    if not ok.all():
        return None
    from . import reference_adapter
    weights = {name: value for name, value in case["weight"].items()}
    if entry["entry_point"] == "moe_route":
        return reference_adapter.moe_route(dict(entry["config"]), weights, case["input"]["hidden"], forced_expert_ids=candidate_ids)["weights"]
    return reference_adapter.moe_layer(dict(entry["config"]), weights, case["input"]["hidden"], entry["args"]["layer"],
                                       forced_expert_ids=candidate_ids)["output"]
