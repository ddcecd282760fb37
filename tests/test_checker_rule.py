"""Meta-tests of the acceptance rule (TOLERANCE.3): each bound pinned from inputs built by hand, just inside and just outside.

The bounds are derived here from the constants of spec/tolerance.yaml, written out below
(and checked against the spec file once), never by calling mla_ref: a looser or stricter
rule in ``compare_tensor`` fails a test. The truth vectors are chosen so that every
norm is exact ([1, -2, 2, 4]: L2 norm 5, rms 2.5), and every bound is an exact binary
fraction times a small integer.
"""

from __future__ import annotations

import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from mla_ref.conformance.check import check
from mla_ref.conformance.compare import compare_tensor
from mla_ref.spec import read_yaml

from conftest import edit_manifest

K = 6.0
UNIT_ROUNDOFF = {"fp64": 2.0 ** -53, "fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}  # IEEE 754, bfloat16
STORAGE = {"fp64": "fp64", "fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}
FLOOR_UNITS = {"fp64": 256.0, "fp32": 4.0, "tf32": 4.0, "bf16": 0.25, "fp16": 0.25, "fp8": 0.25}
ELEMENTWISE_UNITS = {"fp64": 4096.0, "fp32": 512.0, "tf32": 512.0, "bf16": 64.0, "fp16": 64.0, "fp8": 64.0}
PROFILES = sorted(STORAGE)

TRUTH = np.array([1.0, -2.0, 2.0, 4.0])  # L2 norm 5, rms 2.5
TRUTH_L2, TRUTH_RMS = 5.0, 2.5
INSIDE, OUTSIDE = 1.0 - 1e-6, 1.0 + 1e-6


def test_the_constants_written_here_are_the_specs():
    """If the spec's rule changes, these tests' derivations change with it, deliberately."""
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "spec" / "tolerance.yaml").read_text(encoding="utf-8"))
    assert spec["acceptance"]["k"] == K
    assert spec["formats"] == UNIT_ROUNDOFF
    for name, profile in spec["profiles"].items():
        rule = {**spec["acceptance"], **profile.get("acceptance", {})}
        assert (profile["storage"], rule["floor_units"], rule["elementwise_units"]) == (STORAGE[name], FLOOR_UNITS[name], ELEMENTWISE_UNITS[name])


def nudged(truth: np.ndarray, index: int, delta: float) -> np.ndarray:
    candidate = truth.copy()
    candidate[index] += delta
    return candidate


# ------------------------------------------------------------------ L2: err <= k * max(noise, floor)

FLOOR_CASES = [(profile, None) for profile in PROFILES] + [("bf16", "fp32"), ("fp16", "fp32"), ("tf32", "tf32"), ("bf16", "fp64")]
SPREAD = np.array([3.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # L2 norm 5; an error spread over the four zeros is exact in float64


def margin(value: float, bound: float) -> float:
    """How far past a bound "just" is: 1e-6 of it, or four float64 ulps of the candidate where that is more."""
    return max(1e-6, 4 * float(np.spacing(abs(value) + bound)) / bound)


@pytest.mark.parametrize("profile, fmt", FLOOR_CASES)
@pytest.mark.parametrize("noise_in_floors", [0.0, 0.5, 2.0])
def test_l2_allowance_is_k_times_the_larger_of_noise_and_floor(profile, fmt, noise_in_floors):
    floor = FLOOR_UNITS[profile] * UNIT_ROUNDOFF[fmt or STORAGE[profile]] * 5.0
    noise = noise_in_floors * floor
    allowed = K * max(noise, floor)

    def spread(error_l2: float) -> np.ndarray:
        return SPREAD + np.array([0.0, 0.0, 0.5, 0.5, 0.5, 0.5]) * error_l2

    # noise_max = allowed keeps the elementwise bound (>= k x allowed) out of the way
    inside = compare_tensor("x", spread(allowed * INSIDE), SPREAD, noise, profile, fmt=fmt, noise_max=allowed)
    outside = compare_tensor("x", spread(allowed * OUTSIDE), SPREAD, noise, profile, fmt=fmt, noise_max=allowed)
    assert inside.passed, inside.reason
    assert not outside.passed and outside.reason.startswith("L2 error"), outside.reason
    assert inside.allowed_l2 == pytest.approx(allowed, rel=1e-12)
    assert inside.used == pytest.approx(INSIDE, rel=1e-12) and outside.used == pytest.approx(OUTSIDE, rel=1e-12)
    assert outside.error_l2 == pytest.approx(allowed * OUTSIDE, rel=1e-12) and outside.noise_l2 == noise


def test_l2_allowance_by_hand():
    """bf16, truth [3, 4]: floor = 0.25 x 2^-8 x 5 = 0.0048828125, allowed 6 x that; a noise of 0.01 exceeds the floor: allowed 0.06."""
    truth = np.array([3.0, 4.0])
    assert compare_tensor("x", truth, truth, 0.0, "bf16").allowed_l2 == 0.029296875
    assert compare_tensor("x", truth, truth, 0.01, "bf16").allowed_l2 == pytest.approx(0.06, rel=1e-15)
    assert compare_tensor("x", truth + [0.0, 0.0599], truth, 0.01, "bf16").passed
    assert not compare_tensor("x", truth + [0.0, 0.0601], truth, 0.01, "bf16").passed


def test_the_floor_counts_only_finite_elements():
    truth = np.append(TRUTH, [np.nan, np.inf])
    allowed = K * FLOOR_UNITS["bf16"] * UNIT_ROUNDOFF["bf16"] * TRUTH_L2
    assert compare_tensor("x", nudged(truth, 3, allowed * INSIDE), truth, 0.0, "bf16").passed
    assert not compare_tensor("x", nudged(truth, 3, allowed * OUTSIDE), truth, 0.0, "bf16").passed


def test_an_explicit_k_replaces_the_specs():
    allowed = 2.0 * 0.25 * 2.0 ** -8 * TRUTH_L2
    assert compare_tensor("x", nudged(TRUTH, 3, allowed * INSIDE), TRUTH, 0.0, "bf16", k=2.0).passed
    assert not compare_tensor("x", nudged(TRUTH, 3, allowed * OUTSIDE), TRUTH, 0.0, "bf16", k=2.0).passed


# ------------------------------------------------------------------ elementwise: |d| <= max(units u (|t| + rms), k noise_max)

@pytest.mark.parametrize("profile, fmt", FLOOR_CASES)
@pytest.mark.parametrize("index", range(4))
def test_elementwise_bound_in_units_of_the_storage_format(profile, fmt, index):
    bound = ELEMENTWISE_UNITS[profile] * UNIT_ROUNDOFF[fmt or STORAGE[profile]] * (abs(TRUTH[index]) + TRUTH_RMS)
    just = margin(TRUTH[index], bound)
    noise = 10.0 * bound  # the L2 allowance (60 x the bound) stays far away; noise_max 0
    inside = compare_tensor("x", nudged(TRUTH, index, -bound * (1 - just)), TRUTH, noise, profile, fmt=fmt)
    outside = compare_tensor("x", nudged(TRUTH, index, -bound * (1 + just)), TRUTH, noise, profile, fmt=fmt)
    assert inside.passed, inside.reason
    assert not outside.passed and "1 elements exceed the elementwise bound" in outside.reason and f"worst at [{index}]" in outside.reason


@pytest.mark.parametrize("index", range(4))
def test_elementwise_bound_is_never_below_k_times_the_emulations_largest_error(index):
    noise_max = 1.0  # k noise_max = 6 > 64 x 2^-8 x (4 + 2.5) = 1.625, the largest units term
    inside = compare_tensor("x", nudged(TRUTH, index, K * noise_max * INSIDE), TRUTH, 100.0, "bf16", noise_max=noise_max)
    outside = compare_tensor("x", nudged(TRUTH, index, K * noise_max * OUTSIDE), TRUTH, 100.0, "bf16", noise_max=noise_max)
    assert inside.passed, inside.reason
    assert not outside.passed and "elementwise bound" in outside.reason


def test_elementwise_rms_counts_only_finite_elements():
    truth = np.append(TRUTH, np.nan)  # rms over the four finite elements: 2.5
    bound = 64 * 2.0 ** -8 * (1.0 + TRUTH_RMS)
    assert compare_tensor("x", nudged(truth, 0, bound * INSIDE), truth, 100.0, "bf16").passed
    assert not compare_tensor("x", nudged(truth, 0, bound * OUTSIDE), truth, 100.0, "bf16").passed


def test_elementwise_bound_by_hand():
    """bf16: 64 x 2^-8 = 0.25; at the truth's 1.0 the bound is 0.25 x (1 + 2.5) = 0.875; on a scalar, 0.25 x 2 |t|."""
    assert compare_tensor("x", TRUTH + [0.8749, 0, 0, 0], TRUTH, 100.0, "bf16").passed
    assert not compare_tensor("x", TRUTH + [0.8751, 0, 0, 0], TRUTH, 100.0, "bf16").passed
    assert compare_tensor("x", np.array(3.0 + 1.4999), np.array(3.0), 100.0, "bf16").passed
    assert not compare_tensor("x", np.array(3.0 + 1.5001), np.array(3.0), 100.0, "bf16").passed


def test_an_l2_failure_is_reported_before_an_elementwise_one():
    verdict = compare_tensor("x", nudged(TRUTH, 0, 10.0), TRUTH, 0.0, "bf16")
    assert not verdict.passed and verdict.reason.startswith("L2 error") and verdict.used > 1


def test_worst_elements_are_located():
    candidate = TRUTH + [0.0, 0.5, 0.0, 0.75]  # largest absolute error at 3, largest relative at 1 (0.25 vs 0.1875)
    verdict = compare_tensor("x", candidate.reshape(2, 2), TRUTH.reshape(2, 2), 100.0, "bf16")
    assert verdict.worst_abs == {"index": [1, 1], "candidate": 4.75, "truth": 4.0, "value": 0.75}
    assert verdict.worst_rel == {"index": [0, 1], "candidate": -1.5, "truth": -2.0, "value": 0.25}


# ------------------------------------------------------------------ exact: integers, NaN / inf positions

def test_integer_tensors_compare_exactly():
    truth = np.array([[0, 3], [5, 7]])
    assert compare_tensor("ids", truth.copy(), truth, 1e9, "bf16").passed
    assert compare_tensor("ids", truth.astype(np.float32), truth, 0.0, "bf16").passed  # integral floats are fine
    one_off = compare_tensor("ids", truth + [[0, 0], [0, 1]], truth, 1e9, "bf16")
    assert not one_off.passed and "1 of 4 values differ" in one_off.reason and one_off.worst_abs["index"] == [1, 1]
    fractional = compare_tensor("ids", truth + 0.25, truth, 1e9, "bf16")
    assert not fractional.passed and "expected integers" in fractional.reason
    assert not compare_tensor("ids", np.where(truth == 5, np.nan, truth), truth, 1e9, "bf16").passed
    assert compare_tensor("mask", np.array([True, False]), np.array([True, False]), 0.0, "fp32").passed
    assert not compare_tensor("mask", np.array([True, True]), np.array([True, False]), 0.0, "fp32").passed


SPECIAL = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])


@pytest.mark.parametrize("candidate, passed", [
    ([1.0, np.nan, np.inf, -np.inf, 2.0], True),
    ([1.0, 0.0, np.inf, -np.inf, 2.0], False),     # NaN lost
    ([1.0, np.nan, -np.inf, -np.inf, 2.0], False),  # inf of the wrong sign
    ([1.0, np.nan, np.inf, np.inf, 2.0], False),
    ([1.0, np.inf, np.inf, -np.inf, 2.0], False),   # inf where the truth is NaN
    ([1.0, np.nan, np.nan, -np.inf, 2.0], False),   # NaN where the truth is inf
    ([1.0, np.nan, 1e300, -np.inf, 2.0], False),    # finite where the truth is inf
    ([np.nan, np.nan, np.inf, -np.inf, 2.0], False),  # NaN where the truth is finite
    ([np.inf, np.nan, np.inf, -np.inf, 2.0], False),
])
def test_nan_and_inf_positions_must_match(candidate, passed):
    verdict = compare_tensor("x", np.array(candidate), SPECIAL, 1e9, "bf16", noise_max=1e9)
    assert verdict.passed is passed, verdict.reason
    if not passed:
        assert "1 NaN/inf positions differ" in verdict.reason


def test_shape_and_dtype_mismatches_fail():
    assert "shape [4, 1], expected [4]" in compare_tensor("x", TRUTH[:, None], TRUTH, 1e9, "bf16").reason
    assert "expected a float array" in compare_tensor("x", TRUTH.astype(str), TRUTH, 1e9, "bf16").reason


# ------------------------------------------------------------------ properties

FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
TENSORS = arrays(np.float64, array_shapes(min_dims=1, max_dims=3, max_side=5), elements=FINITE)


@settings(max_examples=40, deadline=None)
@given(TENSORS, st.floats(0, 10), st.sampled_from(PROFILES))
def test_the_truth_itself_passes(truth, noise, profile):
    verdict = compare_tensor("x", truth.copy(), truth, noise, profile)
    assert verdict.passed and verdict.error_l2 == 0 and verdict.used == 0


@settings(max_examples=40, deadline=None)
@given(TENSORS, st.floats(0, 10), st.sampled_from(PROFILES))
def test_a_candidate_scaled_past_twice_the_allowance_fails(truth, noise, profile):
    truth_l2 = float(np.linalg.norm(truth))
    if truth_l2 < 1e-3:
        truth = truth + 1.0
        truth_l2 = float(np.linalg.norm(truth))
    allowed_relative = K * max(noise, FLOOR_UNITS[profile] * UNIT_ROUNDOFF[STORAGE[profile]] * truth_l2) / truth_l2
    verdict = compare_tensor("x", truth * (1 + 2 * allowed_relative), truth, noise, profile)
    assert not verdict.passed and verdict.used == pytest.approx(2.0, rel=0.01)  # 2, but for the rounding of a tiny fp64 scale


@settings(max_examples=40, deadline=None)
@given(TENSORS, st.integers(0, 2 ** 32 - 1), st.floats(0.1, 3.0), st.sampled_from(PROFILES))
def test_verdicts_do_not_depend_on_element_order_or_batch_shape(truth, seed, scale, profile):
    """Permuting the elements (cases of a batch in another order) or reshaping the batch changes no verdict."""
    rng = np.random.default_rng(seed)
    noise = float(np.linalg.norm(truth)) * 1e-3 + 1e-6
    candidate = truth + rng.standard_normal(truth.shape) * K * noise * scale / math.sqrt(truth.size)
    noise_max = float(rng.uniform(0, 1e-3))
    verdict = compare_tensor("x", candidate, truth, noise, profile, noise_max=noise_max)
    order = rng.permutation(truth.size)
    shuffled = compare_tensor("x", candidate.ravel()[order], truth.ravel()[order], noise, profile, noise_max=noise_max)
    flat = compare_tensor("x", candidate.reshape(-1, 1), truth.reshape(-1, 1), noise, profile, noise_max=noise_max)
    for other in (shuffled, flat):
        assert other.passed == verdict.passed
        assert other.error_l2 == pytest.approx(verdict.error_l2, rel=1e-12)
        assert other.allowed_l2 == pytest.approx(verdict.allowed_l2, rel=1e-12)


# ------------------------------------------------------------------ verdicts on cases: padded rows, case order

pytestmark = pytest.mark.usefixtures("manifest_parsed_once")  # tests/conftest.py


def _truth_adapter(case_id: str, entry_point: str, edits: dict):
    """An adapter that returns the stored truth of ``case_id`` with ``edits`` ({tensor: (index, value)}) applied."""
    from mla_ref.conformance import check as check_module  # its read_manifest: parsed once (manifest_parsed_once)
    from mla_ref.golden.generate import default_golden_dir
    directory = default_golden_dir()
    case = check_module.load_case(directory, check_module.read_manifest(directory / "manifest.yaml")["cases"][case_id])
    stored = {**case["output"], **case["step"]}

    def entry(*args):
        produced = {name: stored[name].copy() for name in [*case["output"], *edits]}
        for name, (index, value) in edits.items():
            produced[name][index] = value
        return produced
    return types.SimpleNamespace(**{entry_point: entry}), case


# mla.chunked/tiny-yarn: query_lengths [9, 4, 6] of seq 9; MLA.2/q_nope [batch, seq, heads, d], MLA.10/lse [batch, heads, seq]
PADDED = [("MLA.2/q_nope", (1, 4)), ("MLA.2/q_nope", (2, 6)), ("MLA.2/q_nope", (1, slice(4, None))), ("MLA.10/lse", (1, slice(None), 4)),
          ("MLA.10/lse", (2, 0, 8))]
REAL = [("MLA.2/q_nope", (1, 3), "MLA.2"), ("MLA.2/q_nope", (2, 5), "MLA.2"), ("MLA.2/q_nope", (0, 8), "MLA.2"),
        ("MLA.10/lse", (1, slice(None), 3), "MLA.10"), ("MLA.10/lse", (0, 0, 8), "MLA.10")]


@pytest.mark.parametrize("tensor, index", PADDED)
def test_intermediates_at_padded_query_rows_are_not_compared(tensor, index):
    candidate, _ = _truth_adapter("mla.chunked/tiny-yarn/seed0", "mla_extend", {tensor: (index, 1e6)})
    (result,) = check(candidate, "fp64", "mla.chunked/tiny-yarn/seed0").cases
    assert result.status == "pass", result.reason


@pytest.mark.parametrize("tensor, index, step", REAL)
def test_intermediates_at_the_last_real_query_row_are_compared(tensor, index, step):
    candidate, _ = _truth_adapter("mla.chunked/tiny-yarn/seed0", "mla_extend", {tensor: (index, 1e6)})
    (result,) = check(candidate, "fp64", "mla.chunked/tiny-yarn/seed0").cases
    assert result.status == "fail" and result.first_divergent_step == step, result.reason


@pytest.mark.parametrize("index, status", [((1, 1), "pass"), ((1, slice(1, None)), "pass"), ((1, 0), "fail"), ((0, 7), "fail")])
def test_declared_padded_rows_of_mtp_drafting(index, status):
    """mtp_draft declares padded_rows {lengths: prompt_lengths, offset: -1, axis: 1}: prompt_lengths [9, 2] keep 8 and 1 rows."""
    candidate, _ = _truth_adapter("mtp.draft/tiny-dense/seed0", "mtp_draft", {"MTP.1/h0": (index, 1e6)})
    (result,) = check(candidate, "fp64", "mtp.draft/tiny-dense/seed0").cases
    assert result.status == status, result.reason


def test_verdicts_do_not_depend_on_the_order_of_cases(tmp_path):
    """The same golden cases listed in reverse order give the same verdict on every case."""
    from mla_ref.conformance import reference_adapter as ref
    from mla_ref.golden.generate import default_golden_dir
    source = default_golden_dir()
    shutil.copyfile(source / "manifest.yaml", tmp_path / "manifest.yaml")
    edit_manifest(tmp_path, lambda document: document.update(cases=dict(reversed(document["cases"].items()))))  # every case:
    document = read_yaml(tmp_path / "manifest.yaml")  # a manifest missing one is tampered golden
    selected = {case_id for case_id, entry in document["cases"].items()
                if case_id.startswith(("mla.prefill", "moe.route")) and "bf16" in entry["profiles"]}
    for entry in document["cases"].values():
        shutil.copyfile(source / entry["file"], tmp_path / entry["file"])  # a link is refused (GOLDEN.storage)
    broken = types.SimpleNamespace(
        mla_prefill=lambda config, weights, hidden, start_positions: ref.mla_prefill(dict(config, mscale_all_dim=0.0), weights, hidden, start_positions),
        moe_route=ref.moe_route)

    def verdicts(directory):
        return {case.case_id: (case.status, case.used, case.first_divergent_step)
                for case in check(broken, "bf16", directory=directory).cases if case.case_id in selected}
    forward, backward = verdicts(source), verdicts(tmp_path)
    assert forward == backward and list(backward) == list(reversed(list(forward)))
    assert {status for status, _, _ in forward.values()} == {"pass", "fail"}


def test_something_that_is_not_an_array_fails_and_a_verdict_serialises():
    verdict = compare_tensor("x", [[1.0, 2.0], [3.0]], TRUTH, 1.0, "bf16")
    assert not verdict.passed and verdict.reason.startswith("not an array")
    assert compare_tensor("x", TRUTH, TRUTH, 1.0, "bf16").to_dict()["allowed_l2"] == K * 1.0


def test_cosine_distance_is_flashmlas():
    """1 - 2 <x, y> / (|x|^2 + |y|^2): 0 for the truth, 2 for its negation, 1 when orthogonal, 1 - 4/5 at twice the truth."""
    truth = np.array([3.0, 4.0])
    distance = lambda candidate: compare_tensor("x", np.array(candidate), truth, 1e9, "bf16", noise_max=1e9).cosine_distance
    assert (distance([3.0, 4.0]), distance([-3.0, -4.0]), distance([4.0, -3.0])) == (0.0, 2.0, 1.0)
    assert distance([6.0, 8.0]) == pytest.approx(0.2, rel=1e-15)
