"""Check your own inputs: the verdict of a golden case on a user's config, weights, inputs and candidate outputs.

A model author with their own checkpoint and inputs, or an engine's outputs saved from a GPU
run, gets the same judgement as a golden case (GOLDEN.own_inputs): the float64 truth and the
profile's emulation are computed on their data by the golden generator's own code
(:func:`mla_ref.golden.cases.evaluate_case`), and the candidate is judged by the checker's own
:func:`mla_ref.conformance.check.run_case` (TOLERANCE.3 noise rule, TOLERANCE.4 margins, diagnosis).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from ..config import ModelConfig, load_config
from ..errors import GoldenError, InputError
from ..golden.cases import Case, case_definitions, evaluate_case
from ..golden.storage import read_npz, read_safetensors
from ..spec import load_spec_file
from ..trace import profile as trace_profile
from .check import CaseResult, Report, run_case
from .protocol import entry_points, parameters

CASE_ID = "own-inputs"


def read_tensors(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """The tensors of an ``.npz`` or ``.safetensors`` file (never a pickle); InputError naming ``what`` if it cannot be read."""
    path = Path(path)
    if path.suffix not in (".npz", ".safetensors"):
        raise InputError(what, f"expected an .npz or .safetensors file, got {path}", "GOLDEN.own_inputs")
    if not path.is_file():
        raise InputError(what, f"no such file: {path}", "GOLDEN.own_inputs")
    try:
        return read_npz(path) if path.suffix == ".npz" else read_safetensors(path)[0]
    except GoldenError as error:
        raise InputError(what, error.problem, "GOLDEN.own_inputs") from None


def parse_arguments(pairs: list[str]) -> dict[str, Any]:
    """``["steps=4", "causal=true", "softmax_scale=0.1"]`` -> ``{"steps": 4, "causal": True, "softmax_scale": 0.1}`` (YAML scalars)."""
    import yaml
    parsed = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals or not name:
            raise InputError("--arg", f"expected NAME=VALUE, got {pair!r}", "GOLDEN.own_inputs")
        value = yaml.safe_load(text)
        if not isinstance(value, (bool, int, float)):
            raise InputError(f"--arg {name}", f"expected a number or true / false, got {text!r}", "GOLDEN.own_inputs")
        parsed[name] = value
    return parsed


def _level(entry_point: str) -> str:
    """The level of the golden cases of ``entry_point`` (kernel, layer or model)."""
    return next(case["level"] for case in case_definitions() if case["entry_point"] == entry_point)


def _profiles(profile: str) -> list[str]:
    """``profile`` and the profile its noise is derived from (TOLERANCE.2 ``noise_from``), that one first."""
    known = load_spec_file("tolerance.yaml")["profiles"]
    if profile not in known:
        raise InputError("profile", f"unknown profile {profile!r}; expected one of {sorted(known)}", "TOLERANCE.2")
    source = (trace_profile(profile).get("noise_from") or {}).get("profile")
    return [source, profile] if source else [profile]


def _split_arguments(entry_point: str, inputs: Mapping[str, Any], args: Mapping[str, Any]) -> tuple[dict, dict]:
    """The entry point's array inputs and scalar arguments, each parameter given exactly once (InputError naming the one missing)."""
    wanted = [name for name in parameters(entry_point) if name not in ("config", "weights")]
    doc = entry_points()[entry_point]["doc"]
    unknown = [name for name in [*inputs, *args] if name not in wanted]
    if unknown:
        raise InputError(unknown[0], f"is no parameter of {entry_point}; expected {wanted} ({doc})", "GOLDEN.own_inputs")
    missing = [name for name in wanted if name not in inputs and name not in args]
    if missing:
        raise InputError(missing[0], f"missing input of {entry_point}; expected {wanted} ({doc})", "GOLDEN.own_inputs")
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    for name, value in arrays.items():
        if value.dtype.kind not in "biuf":
            raise InputError(name, f"expected a numeric array, got dtype {value.dtype} ({doc})", "GOLDEN.own_inputs")
    scalars = {name: (value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value) for name, value in args.items()}
    return arrays, scalars


def own_case(entry_point: str, config: str | Path | Mapping[str, Any] | ModelConfig, weights: Mapping[str, Any],
             inputs: Mapping[str, Any], profile: str, args: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """The manifest entry and the tensors (split by kind, as check.load_case returns them) of a case built on the user's data."""
    if entry_point not in entry_points():
        raise InputError("entry_point", f"unknown entry point {entry_point!r}; expected one of {sorted(entry_points())}", "GOLDEN.own_inputs")
    config = load_config(config)
    arrays, scalars = _split_arguments(entry_point, inputs, dict(args or {}))
    definition = {"id": CASE_ID, "entry_point": entry_point, "level": _level(entry_point), "steps": [], "layout": {},
                  "profiles": _profiles(profile)}
    weights = {name: np.asarray(value) for name, value in weights.items()}
    case = evaluate_case(Case(CASE_ID, definition, config, scalars, arrays, weights))
    steps = list(dict.fromkeys(key.split("/")[0] for key in case.steps))  # in the order the forward ran them
    entry = {"entry_point": entry_point, "level": definition["level"], "steps": steps, "args": scalars, "config": config.to_dict(),
             "profiles": {name: {"noise": case.noise[name], "noise_max": case.noise_max[name]} for name in case.noise}}
    tensors = {"input": arrays, "weight": weights, "output": case.outputs, "step": case.steps, "emulated": case.emulated,
               "margin": case.margins}
    return entry, tensors


def check_outputs(entry_point: str, config: str | Path | Mapping[str, Any] | ModelConfig, weights: Mapping[str, Any],
                  inputs: Mapping[str, Any], candidate_outputs: Mapping[str, Any], profile: str, *,
                  args: Mapping[str, Any] | None = None, name: str = "candidate") -> Report:
    """GOLDEN.own_inputs — judge ``candidate_outputs`` of ``entry_point`` on the user's own data as a golden case is judged.

    ``config``: a preset name, a config file (HF config.json, official or preset YAML), a dict or a
    ModelConfig; ``weights``, ``inputs``: name -> array as the entry point takes them (spec/golden.yaml
    adapter.entry_points); ``args``: its scalar arguments (``steps``, ``layer``, ...). The outputs
    may carry intermediates ``"<STEP>/<name>"``: they are compared too and name the first divergent step.
    Returns a :class:`Report` of one case; bad input raises InputError, ShapeError or WeightError naming the tensor.
    """
    entry, tensors = own_case(entry_point, config, weights, inputs, profile, args)
    candidate = SimpleNamespace(**{entry_point: lambda *arguments: candidate_outputs})
    result: CaseResult = run_case(candidate, None, CASE_ID, entry, profile, name, case=tensors)
    result.repro = ""
    return Report(name, profile, [result])
