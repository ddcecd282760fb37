"""The conformance checker: run an adapter on the golden cases and say what is right and which step is wrong.

One engine behind three ways in: ``mla-ref check ADAPTER``, ``pytest --pyargs
mla_ref.conformance`` (adapter named by ``MLA_REF_ADAPTER``) and :func:`check`. A run that
would check nothing is refused (selection.py), a golden folder that is not what the spec and
the generator made is refused (golden/integrity.py), and whatever an adapter does or returns
fails its own case only (arrays.py; isolate.py runs it in a child process).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import GoldenError, InputError, Unsupported
from ..golden.cases import stored_recipe_weights
from ..golden.generate import default_golden_dir
from ..golden.integrity import require_manifest_matches_spec, verify_case_tensors
from ..golden.manifest import read_manifest
from ..golden.storage import read_npz
from ..spec import load_spec_file
from ..trace import storage_format
from .arrays import as_array, dtype_unit_roundoff
from .compare import Comparison, compare_tensor, unit_roundoff
from .isolate import ConvertedOutputs, IsolatedFailure, adapter_reference, isolated_caller
from .protocol import call, entry_points
from .diagnose import diagnose
from .margins import judge_choices
from .selection import check_waivers, nearest_entry_points, require_runnable, select_cases

REPORT_SCHEMA = "mla-ref-check-report/1"  # spec/schemas/check-report.schema.json

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
    notes: list[str] = dataclasses.field(default_factory=list)  # choices accepted by margin (TOLERANCE.4)
    repro: str = ""
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)
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
        """The report as strict JSON (schema ``REPORT_SCHEMA``): a non-finite number is written as the string "inf", "-inf" or "nan"."""
        document = {"schema": REPORT_SCHEMA, "adapter": self.adapter, "profile": self.profile, "summary": self.summary(), **self.counts(),
                    "released_model_configs": self.counts(extension=False), "extensions": self.counts(extension=True),
                    "cases": [case.to_dict() for case in self.cases]}
        return json.dumps(_finite_json(document), indent=1, default=_json_default, allow_nan=False)

    def table(self) -> str:
        lines = [f"{'case':58s} {'status':7s} {'used':>8s}  detail"]
        for case in self.cases:
            used = "" if case.status in ("skip", "unsupported") else format_used(case.used)
            detail = case.reason
            if case.extension:
                detail = f"[extension] {detail}"  # the why: the JSON report and spec/golden.yaml
            if case.first_divergent_step:
                detail = f"{divergence_text(case)}; {detail}"
            if case.diagnosis:
                detail += " | looks like: " + "; ".join(case.diagnosis)
            lines.append(f"{case.case_id:58s} {case.status:7s} {used:>8s}  {detail}")
            lines += [f"{'':58s}   {note}" for note in case.notes]
            lines += [f"{'':58s}   warning: {warning}" for warning in case.warnings]
            if case.status in ("fail", "xpass") and case.repro:
                lines.append(f"{'':58s}   repro: {case.repro}")
        lines.append(self.summary())
        return "\n".join(lines)


class CheckInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`check`: ``report`` holds the cases finished before it, ``total`` the number selected."""

    def __init__(self, report: Report, total: int) -> None:
        super().__init__(f"interrupted after {len(report.cases)} of {total} cases")
        self.report = report
        self.total = total


def divergence_text(case: CaseResult) -> str:
    """Where a failing case first diverges, claimed only as far as the returned tensors show it.

    An intermediate that fails is evidence of the first divergent step; from outputs alone (or with
    every returned intermediate passing) only the step that yields the failing output is known.
    """
    steps = [c for c in case.comparisons if "/" in c.name]
    if any(not c.passed for c in steps):
        return f"first divergent step {case.first_divergent_step}"
    known = "no intermediate returned" if not steps else "every returned intermediate passes"
    return f"fails at output step {case.first_divergent_step} ({known})"


def format_used(used: float) -> str:
    """The share of the allowed error: ``37.2%`` up to 10x, then a multiple (``x94.6``, ``x4.8e12``); ``inf`` for an exact mismatch."""
    if not math.isfinite(used):
        return "inf"
    if used < 10:
        return f"{100 * used:.1f}%"
    if used < 1000:
        return f"x{used:.3g}"
    mantissa, exponent = f"{used:.1e}".split("e")
    return f"x{mantissa}e{int(exponent)}"


def _finite_json(value: Any):
    """``value`` with every non-finite float (Python or NumPy) replaced by "inf", "-inf" or "nan" (strict JSON has none)."""
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _json_default(value: Any):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(type(value).__name__)


def check_report_path(path: Path) -> None:
    """An InputError now, before a long run, if the JSON report could not be written to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise InputError("report", f"{path} is a folder, expected a file path", "GOLDEN.report")
    if not path.parent.is_dir():
        raise InputError("report", f"folder {path.parent} does not exist", "GOLDEN.report")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK)
    if not writable:
        raise InputError("report", f"{path} is not writable", "GOLDEN.report")


def load_adapter(name: str | Any) -> Any:
    """The adapter that ``name`` names (spec/golden.yaml ``adapter.loading``); an object that is not a string is the adapter.

    ``name`` is a module (``my_adapter``, ``examples.torch_adapter``: the current directory is
    searched too), a ``.py`` file (one inside a package is imported as that package's module,
    so its relative imports work), or either followed by ``:attribute`` (``my_adapter:ADAPTER``).
    One resolver for ``mla-ref check``, ``MLA_REF_ADAPTER`` and :func:`check`.
    """
    if not isinstance(name, str):
        return name
    target, attribute = _split_attribute(name)
    try:
        module = _import_file(Path(target)) if _is_path(target) else _import_module_from_cwd(target)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - any import failure is the adapter's
        hint = "" if _is_path(target) else f" (searched sys.path and the current directory {Path.cwd()})"
        raise InputError("adapter", f"cannot import {name!r}: {type(error).__name__}: {error}{hint}", "GOLDEN.adapter") from None
    adapter = module
    for part in attribute.split(".") if attribute else []:
        if not hasattr(adapter, part):
            raise InputError("adapter", f"{target!r} has no attribute {attribute!r}", "GOLDEN.adapter")
        adapter = getattr(adapter, part)
    return adapter


def _split_attribute(name: str) -> tuple[str, str]:
    """``module:attribute`` or ``path.py:attribute`` -> (target, attribute); a bare name has no attribute."""
    target, colon, attribute = name.rpartition(":")
    if colon and target and all(part.isidentifier() for part in attribute.split(".")):
        return target, attribute
    return name, ""


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target or Path(target).is_file()


def _import_module_from_cwd(module_name: str) -> ModuleType:
    """Import a (dotted) module, with the current directory on sys.path as ``python -m`` has it (console scripts do not)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(module_name)


def _import_file(path: Path) -> ModuleType:
    """Import a ``.py`` file: inside a package (``__init__.py`` beside it) as the package's module, else on its own."""
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) == 1:
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))  # so the adapter can import modules beside it
        spec = importlib.util.spec_from_file_location(f"mla_ref_adapter_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    dotted = ".".join(parts)
    module = importlib.import_module(dotted)
    imported = Path(getattr(module, "__file__", "") or "").resolve()
    if imported != path and not (imported.is_file() and imported.read_bytes() == path.read_bytes()):
        raise InputError("adapter", f"{path} is the module {dotted}, but {dotted} is imported from {imported} "
                         f"(another copy): install this checkout (pip install -e .) or name the module", "GOLDEN.adapter")
    return module


def check(adapter, profile: str | None = None, select: str | None = None, *, step: str | None = None,
          level: str | None = None, waivers: Mapping[str, str] | None = None, directory: Path | None = None,
          adapter_name: str | None = None, isolate: bool = False, timeout: float | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Run ``adapter`` on every selected golden case under ``profile`` (default: the adapter's PROFILE, else fp32).

    Refused with an InputError where the run would check nothing (selection.py) and with a
    GoldenError where the golden folder is not what spec/golden.yaml and the generator made.
    ``isolate`` (implied by ``timeout``, seconds per case): each adapter call in a child process.
    ``progress(done, total, case_id)`` is called before each case (mla_ref.progress.Progress
    draws it). Interrupted (Ctrl-C), it raises :class:`CheckInterrupted` holding the report of
    the cases finished so far.
    """
    module = load_adapter(adapter)
    profile = profile or getattr(module, "PROFILE", None) or "fp32"
    profiles = load_spec_file("tolerance.yaml")["profiles"]
    if profile not in profiles:
        raise InputError("profile", f"unknown profile {profile!r}; expected one of {sorted(profiles)}", "TOLERANCE.2")
    directory = Path(directory or default_golden_dir())
    manifest = read_manifest(directory / "manifest.yaml")
    require_manifest_matches_spec(manifest, directory / "manifest.yaml")
    name = adapter_name or (adapter if isinstance(adapter, str) else getattr(module, "__name__", type(module).__name__))
    chosen = select_cases(manifest["cases"], select, step, level)
    require_runnable(module, name, manifest["cases"], chosen, profile)
    check_waivers(waivers or {}, manifest["cases"])
    caller = isolated_caller(adapter_reference(adapter), timeout) if isolate or timeout is not None else _call
    results: list[CaseResult] = []
    for done, case_id in enumerate(chosen):
        entry = manifest["cases"][case_id]
        if progress is not None:
            progress(done, len(chosen), case_id)
        try:
            result = _judged(module, directory, case_id, entry, profile, name, caller)
        except KeyboardInterrupt:
            raise CheckInterrupted(Report(name, profile, results), len(chosen)) from None
        waiver = next((reason for pattern, reason in (waivers or {}).items() if fnmatch.fnmatch(case_id, pattern)), None)
        if waiver is not None:
            result.status = "waived" if result.status == "fail" else ("xpass" if result.status == "pass" else result.status)
            result.reason = f"waived: {waiver}" if result.status == "waived" else (f"unexpected pass of a waived case ({waiver})" if result.status == "xpass" else result.reason)
        results.append(result)
    return Report(name, profile, results)


def _judged(module, directory: Path, case_id: str, entry: dict, profile: str, adapter_name: str, caller) -> CaseResult:
    """run_case, with any error of the checker on this adapter's output failing the case instead of the run (a golden error aborts)."""
    try:
        return run_case(module, directory, case_id, entry, profile, adapter_name, caller=caller)
    except GoldenError:
        raise
    except Exception as error:  # noqa: BLE001 - an output the checker cannot judge is the case's failure
        return CaseResult(case_id, entry["entry_point"], entry["level"], "fail",
                          f"the checker could not judge the adapter's output: {type(error).__name__}: {error}",
                          repro=f"mla-ref check {adapter_name} --profile {profile} --select '{case_id}'")


def load_case(directory: Path, entry: dict) -> dict[str, dict[str, np.ndarray]]:
    """A case file split by kind: inputs, weights, outputs, steps ("MLA.2/q_nope"), emulated, margins.

    Every tensor is checked against the manifest's sha256 first (GoldenError: tampered golden).
    A model-level case stores the recipe of its weights instead of the weights: they are
    rebuilt here and checked against the manifest's digest.
    """
    tensors = read_npz(directory / entry["file"])
    verify_case_tensors(entry, tensors)
    parts: dict[str, dict[str, np.ndarray]] = {"input": {}, "weight": {}, "output": {}, "step": {}, "emulated": {}, "margin": {}}
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


def run_case(module, directory: Path | None, case_id: str, entry: dict, profile: str, adapter_name: str = "ADAPTER", *,
             caller=None, case: dict | None = None) -> CaseResult:
    """Run one case and compare every output (and every intermediate the adapter returns).

    ``caller(module, entry, case)`` calls the adapter (default: in this process; isolate.py: in a child).
    A golden file that does not match its manifest raises GoldenError: a tampered truth is never the adapter's failure.
    ``case``: the case's tensors split by kind as :func:`load_case` returns them, built in memory (own_inputs.py).
    """
    started = time.perf_counter()
    result = CaseResult(case_id, entry["entry_point"], entry["level"], "pass",
                        repro=f"mla-ref check {adapter_name} --profile {profile} --select '{case_id}'", extension=entry.get("extension", ""))
    if not callable(getattr(module, entry["entry_point"], None)):
        result.status, result.reason = "skip", f"adapter has no entry point {entry['entry_point']}" + _misspelled(module, entry["entry_point"])
        return result
    case = case if case is not None else load_case(directory, entry)
    noise = entry["profiles"].get(profile, {}).get("noise")
    noise_max = entry["profiles"].get(profile, {}).get("noise_max", {})
    if noise is None:
        result.status, result.reason = "skip", f"case has no {profile} profile"
        return result
    try:
        produced = (caller or _call)(module, entry, case)
    except Unsupported as error:
        result.status, result.reason = "unsupported", error.reason
        return result
    except (Exception, SystemExit) as error:  # noqa: BLE001 - a broken adapter (even one that exits) must not end the run
        result.status, result.reason = "fail", adapter_failure(error)
        return result
    if not isinstance(produced, Mapping):
        result.status, result.reason = "fail", f"adapter returned {type(produced).__name__}, expected a dict of arrays"
        return result
    produced, source_dtypes, unconvertible = _as_arrays(produced, case)
    result.warnings = _unknown_names(entry, case, produced, unconvertible)
    judged = [name for name in unconvertible if _is_judged(entry, case, name)]
    if judged:
        result.status = "fail"
        result.reason = "; ".join(f"{name}: cannot convert to an array: {unconvertible[name]}" for name in judged)
        return result
    outputs = entry_points()[entry["entry_point"]]["outputs"]
    missing = [name for name in outputs if name not in produced]
    if missing:
        result.status, result.reason = "fail", f"missing outputs {missing} (returned {sorted(produced)})"
        return result
    produced = _align_expert_order(produced, case["output"], case["step"])
    judgement = judge_choices(entry, case, produced, profile)  # TOLERANCE.4: ties and near ties, the truth under accepted choices
    result.notes, result.comparisons = judgement.notes, list(judgement.comparisons)
    truth_outputs, truth_steps = {**case["output"], **judgement.outputs}, {**case["step"], **judgement.steps}
    compared = _align_expert_order(produced, truth_outputs, truth_steps, by_row=True)  # sets judged, in the candidate's order
    output_steps = entry_points()[entry["entry_point"]]["output_steps"]
    for name in [name for name in truth_outputs if name in produced and name not in judgement.judged]:
        fmt = storage_format(profile, output_steps[name], name)
        result.comparisons.append(compare_tensor(name, compared[name], truth_outputs[name], noise.get(f"output:{name}", 0.0), profile,
                                                 fmt=fmt, noise_max=noise_max.get(f"output:{name}", 0.0)))
    step_results = []
    for key, truth in truth_steps.items():
        if key in produced:
            step, tensor = key.split("/")
            truth, produced_value = _without_padding(entry, case, step, tensor, truth, compared[key])
            comparison = compare_tensor(key, produced_value, truth, noise.get(f"step:{step}:{tensor}", 0.0), profile,
                                        fmt=storage_format(profile, step, tensor), noise_max=noise_max.get(f"step:{step}:{tensor}", 0.0))
            result.comparisons.append(comparison)
            step_results.append((step, comparison))
    failures = [c for c in result.comparisons if not c.passed]
    if failures:
        result.status = "fail"
        result.reason = _failure_reason(entry, failures)
        result.warnings += _dtype_hints(entry, failures, source_dtypes, profile)
        order = entry["steps"]
        diverged = [step for step, c in step_results if not c.passed]
        if not diverged:  # no intermediate returned, or none failing: blame the step that yields the failing output
            diverged = [output_steps[c.name] for c in failures if c.name in output_steps]
        ranked = [step for step in diverged if step in order]
        result.first_divergent_step = min(ranked, key=order.index) if ranked else (diverged[0] if diverged else None)
        result.diagnosis = diagnose(entry, {**case, "output": truth_outputs, "step": truth_steps}, produced, profile, failures)
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


def _align_expert_order(produced: Mapping, outputs: Mapping, steps: Mapping, by_row: bool = False) -> dict:
    """Experts chosen as the truth chose them but listed in another order (near ties inside the top-k reorder
    under low precision) are reordered, with the weights aligned to them: the set and the weights are what count.
    The DSA selection (``indices``, DSA.10) likewise: its set is specified, not its order. ``by_row`` (for the
    comparisons, after TOLERANCE.4 judged the sets): row by row, a row with another set keeping the ids it shares
    with the truth in the truth's slots; otherwise only an array holding the truth's set in every row."""
    produced = dict(produced)
    for ids_name, weights_name in (("expert_ids", "weights"), ("MOE.7/expert_ids", "MOE.8/weights"), ("MOE.5/kept_groups", None),
                                   ("indices", None), ("DSA.10/indices", None)):
        truth = outputs.get(ids_name, steps.get(ids_name))
        if truth is None or ids_name not in produced:
            continue
        candidate = np.asarray(produced[ids_name])
        if candidate.shape != truth.shape or candidate.dtype.kind not in "iu" or np.array_equal(candidate, truth):
            continue
        other_set = np.any(np.sort(candidate, axis=-1) != np.sort(truth, axis=-1), axis=-1)
        if other_set.any() and not by_row:
            continue
        order = np.argsort(candidate, axis=-1, kind="stable")
        target = np.argsort(np.argsort(truth, axis=-1, kind="stable"), axis=-1, kind="stable")
        permutation = np.take_along_axis(order, target, axis=-1)  # candidate slot of each truth slot, where the sets agree
        for row in np.argwhere(other_set):
            permutation[tuple(row)] = _slots_as_truth(candidate[tuple(row)].tolist(), truth[tuple(row)].tolist())
        produced[ids_name] = np.take_along_axis(candidate, permutation, axis=-1)
        if weights_name is not None and weights_name in produced and np.shape(produced[weights_name]) == truth.shape:
            produced[weights_name] = np.take_along_axis(np.asarray(produced[weights_name]), permutation, axis=-1)
    return produced


def _slots_as_truth(candidate: list[int], truth: list[int]) -> list[int]:
    """For a row whose set differs from the truth's: the candidate slot of each truth slot, an id both hold in the truth's
    slot and the candidate's other ids in their own order in the slots left, so only the ids that differ are counted."""
    slots: dict[int, list[int]] = {}
    for slot, value in enumerate(candidate):
        slots.setdefault(value, []).append(slot)
    shared = [slots[value].pop(0) if slots.get(value) else None for value in truth]
    rest = sorted(slot for left in slots.values() for slot in left)
    return [slot if slot is not None else rest.pop(0) for slot in shared]


def adapter_failure(error: BaseException) -> str:
    """An adapter's exception as its case reports it, once: type, message and where it was raised."""
    if isinstance(error, IsolatedFailure):
        return str(error)
    if isinstance(error, SystemExit):
        return f"adapter called sys.exit({error.code!r}) (raised SystemExit): an adapter returns its outputs, it never exits"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"adapter raised {type(error).__name__}: {error}{where}"


def _misspelled(module, entry_point: str) -> str:
    guesses = [name for name, entry in nearest_entry_points(module).items() if entry == entry_point]
    return f" (it defines {guesses[0]!r}: misspelled?)" if guesses else ""


def _as_arrays(produced: Mapping, case: dict) -> tuple[dict, dict[str, str], dict[str, str]]:
    """Every returned value as a NumPy array, the dtype each came in, and why others could not be converted.

    Integral floats where the truth holds integers (expert ids as float64) become int64, as the comparison accepts them.
    """
    if isinstance(produced, ConvertedOutputs):  # converted in the child process already
        arrays, sources, unconvertible = dict(produced), produced.source_dtypes, produced.unconvertible
    else:
        arrays, sources, unconvertible = {}, {}, {}
        for name, value in produced.items():
            try:
                arrays[name], sources[name] = as_array(value)
            except Exception as error:  # noqa: BLE001 - an adapter may return anything
                unconvertible[name] = f"{type(error).__name__}: {error}"
    truths = {**case["output"], **case["step"]}
    for name, array in arrays.items():
        truth = truths.get(name)
        if (truth is not None and truth.dtype.kind in "iu" and array.dtype.kind == "f" and np.isfinite(array).all()
                and np.array_equal(array, np.round(array))):
            arrays[name] = array.astype(np.int64)
    return arrays, sources, unconvertible


def _is_judged(entry: dict, case: dict, name) -> bool:
    """Would the checker compare a returned value under this name (an output of the entry point, or a stored intermediate)?"""
    protocol = entry_points()[entry["entry_point"]]
    return name in protocol["outputs"] or name in protocol.get("optional", []) or name in case["step"]


def _unknown_names(entry: dict, case: dict, produced: Mapping, unconvertible: Mapping) -> list[str]:
    """Warnings for returned names that are neither an output of the entry point nor ``<STEP>/<name>`` of a spec step (not compared)."""
    from ..explain import all_steps
    protocol = entry_points()[entry["entry_point"]]
    outputs = [*protocol["outputs"], *protocol.get("optional", [])]
    steps = all_steps()
    warnings = []
    for name in [*produced, *unconvertible]:
        step, _, tensor = str(name).partition("/")
        if name in outputs or (tensor and tensor in steps.get(step, {}).get("outputs", {})):
            continue  # an output, or an intermediate the spec names (compared where the case stores it)
        known = outputs + list(case["step"]) + [f"{step}/{output}" for output in steps.get(step, {}).get("outputs", {})]
        nearest = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        warnings.append(f"returned {str(name)!r}, which is no output of {entry['entry_point']} ({', '.join(outputs)}) nor a spec "
                        f"intermediate '<STEP>/<name>'; not compared" + (f" (did you mean {nearest[0]!r}?)" if nearest else ""))
    return warnings


def _failure_reason(entry: dict, failures: list[Comparison]) -> str:
    """What failed: the first three failures, said to be intermediates or optional outputs only where the required outputs pass."""
    detail = "; ".join(f"{c.name}: {c.reason}" for c in failures[:3])
    required = entry_points()[entry["entry_point"]]["outputs"]
    if any(c.name in required for c in failures):
        return detail
    named = ", ".join(("intermediate " if "/" in c.name else "optional output ") + c.name for c in failures)
    return f"required outputs pass, {named} {'fails' if len(failures) == 1 else 'fail'}: {detail}"


def _dtype_hints(entry: dict, failures: list[Comparison], source_dtypes: Mapping[str, str], profile: str) -> list[str]:
    """For a failing tensor returned in a dtype coarser than the profile stores it in: say so (float16 under fp32)."""
    output_steps = entry_points()[entry["entry_point"]]["output_steps"]
    hints = []
    for comparison in failures:
        source = source_dtypes.get(comparison.name)
        coarse = dtype_unit_roundoff(source) if source else None
        step, _, tensor = comparison.name.partition("/")
        fmt = storage_format(profile, step, tensor) if tensor else storage_format(profile, output_steps[comparison.name], comparison.name)
        expected = unit_roundoff(profile, fmt)
        if coarse is not None and coarse > 1.5 * expected:
            hints.append(f"{comparison.name} came as {source} (unit roundoff {coarse:.1e}), coarser than the {fmt} that profile "
                         f"{profile} expects for it ({expected:.1e}): return it in {fmt} or wider, or check under a profile of "
                         "that precision")
    return hints
