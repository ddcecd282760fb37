"""TOLERANCE.3 — compare one candidate tensor with the float64 truth under a precision profile.

The rule is noise-relative (spec/tolerance.yaml ``acceptance``): the candidate's L2 error
may be at most k times the error of the reference's own emulation of the profile, with a
floor in units of the format's unit roundoff, plus an elementwise bound. Integer tensors
and the positions of NaN / inf must match exactly. Every comparison says how much of the
allowed error it used (``headroom``) and where the worst element is.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..spec import load_spec_file


def acceptance(profile_name: str | None = None) -> dict:
    """The ``acceptance`` constants of spec/tolerance.yaml, with a profile's own overrides."""
    spec = load_spec_file("tolerance.yaml")
    rule = dict(spec["acceptance"])
    if profile_name is not None:
        rule.update(spec["profiles"][profile_name].get("acceptance", {}))
    return rule


def unit_roundoff(profile_name: str, fmt: str | None = None) -> float:
    """Unit roundoff of ``fmt``, or of the profile's storage format."""
    spec = load_spec_file("tolerance.yaml")
    return float(spec["formats"][fmt or spec["profiles"][profile_name]["storage"]])


@dataclasses.dataclass
class Comparison:
    """The verdict on one tensor, with everything a report prints."""

    name: str
    passed: bool
    reason: str = ""
    error_l2: float = 0.0
    noise_l2: float = 0.0
    allowed_l2: float = 0.0
    used: float = 0.0  # error / allowed: 0.37 means "used 37% of the allowed error"
    relative_l2: float = 0.0
    cosine_distance: float = 0.0
    worst_abs: dict | None = None
    worst_rel: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _worst(index_flat: int, shape: tuple, candidate: np.ndarray, truth: np.ndarray, value: float) -> dict:
    index = tuple(int(i) for i in np.unravel_index(index_flat, shape)) if shape else ()
    return {"index": list(index), "candidate": float(candidate.flat[index_flat]), "truth": float(truth.flat[index_flat]), "value": float(value)}


def compare_tensor(name: str, candidate, truth: np.ndarray, noise_l2: float, profile_name: str, *,
                   fmt: str | None = None, noise_max: float = 0.0, k: float | None = None) -> Comparison:
    """TOLERANCE.3 — accept iff ``||cand - truth|| <= k * max(noise, floor)`` and the elementwise bound holds.

    ``noise_l2`` is ``||emulated - truth||_2`` for this tensor under the profile, ``noise_max``
    its largest element; ``fmt`` the format the profile stores it in (the floor and the
    elementwise bound are in its units, the bound never below k * noise_max: a tensor stored
    in fp32 but computed from bf16 inputs carries bf16-sized errors).
    """
    rule = acceptance(profile_name)
    k = float(rule["k"]) if k is None else k
    truth = np.asarray(truth)
    try:
        candidate = np.asarray(candidate)
    except Exception as error:  # noqa: BLE001 - a broken adapter may return anything
        return Comparison(name, False, f"not an array: {error}")
    if candidate.shape != truth.shape:
        return Comparison(name, False, f"shape {list(candidate.shape)}, expected {list(truth.shape)}")
    if truth.dtype.kind in "iub":
        if candidate.dtype.kind not in "iub" and not (candidate.dtype.kind == "f" and np.all(np.isfinite(candidate)) and np.all(candidate == np.round(candidate))):
            return Comparison(name, False, f"dtype {candidate.dtype}, expected integers like {truth.dtype}")
        mismatched = np.flatnonzero(candidate.astype(np.int64).ravel() != truth.astype(np.int64).ravel())
        if mismatched.size:
            first = mismatched[0]
            return Comparison(name, False, f"{mismatched.size} of {truth.size} values differ (exact comparison)",
                              worst_abs=_worst(first, truth.shape, candidate.astype(np.float64), truth.astype(np.float64), 0.0))
        return Comparison(name, True)
    if candidate.dtype.kind not in "fiu":
        return Comparison(name, False, f"dtype {candidate.dtype}, expected a float array")
    candidate = candidate.astype(np.float64)
    truth = truth.astype(np.float64)
    finite = np.isfinite(truth)
    special_mismatch = (np.isfinite(candidate) != finite) | (~finite & ~(np.isnan(truth) & np.isnan(candidate)) & (candidate != truth))
    if special_mismatch.any():
        first = int(np.flatnonzero(special_mismatch.ravel())[0])
        return Comparison(name, False, f"{int(special_mismatch.sum())} NaN/inf positions differ from the truth",
                          worst_abs=_worst(first, truth.shape, candidate, truth, 0.0))
    truth_finite = np.where(finite, truth, 0.0)
    difference = np.where(finite, candidate, 0.0) - truth_finite
    error_l2 = float(np.linalg.norm(difference))
    truth_l2 = float(np.linalg.norm(truth_finite))
    u = unit_roundoff(profile_name, fmt)
    floor = float(rule["floor_units"]) * u * truth_l2
    allowed = k * max(noise_l2, floor)
    rms = truth_l2 / math.sqrt(max(1, int(finite.sum())))
    bound = np.maximum(float(rule["elementwise_units"]) * u * (np.abs(truth_finite) + rms), k * noise_max)
    absolute = np.abs(difference)
    with np.errstate(over="ignore", divide="ignore"):
        relative = absolute / np.maximum(np.abs(truth_finite), np.finfo(np.float64).tiny)
    result = Comparison(name, True, error_l2=error_l2, noise_l2=float(noise_l2), allowed_l2=allowed,
                        used=error_l2 / allowed if allowed > 0 else (0.0 if error_l2 == 0 else math.inf),
                        relative_l2=error_l2 / truth_l2 if truth_l2 else error_l2,
                        cosine_distance=_cosine_distance(candidate[finite], truth[finite]))
    if absolute.size:
        result.worst_abs = _worst(int(np.argmax(absolute)), truth.shape, candidate, truth, float(absolute.max()))
        result.worst_rel = _worst(int(np.argmax(relative)), truth.shape, candidate, truth, float(relative.max()))
    if error_l2 > allowed:
        result.passed = False
        result.reason = f"L2 error {error_l2:.3e} > allowed {allowed:.3e} (k = {k} x max(emulation noise {noise_l2:.3e}, floor {floor:.3e}))"
    elif (absolute > bound).any():
        result.passed = False
        over = int(np.argmax(absolute - bound))
        result.reason = (f"{int((absolute > bound).sum())} elements exceed the elementwise bound "
                         f"(max({rule['elementwise_units']} u (|truth| + rms), k x the emulation's largest error {noise_max:.3e})); "
                         f"worst at {[int(i) for i in np.unravel_index(over, truth.shape)]}")
    return result


def _cosine_distance(candidate: np.ndarray, truth: np.ndarray) -> float:
    """FlashMLA's ``1 - 2<x, y> / (|x|^2 + |y|^2)`` (0 for identical tensors)."""
    denominator = float(np.dot(candidate, candidate) + np.dot(truth, truth))
    return 0.0 if denominator == 0 else 1.0 - 2.0 * float(np.dot(candidate, truth)) / denominator
