"""Proving the checker: it accepts our torch adapter and rejects every mutant of tests/mutants/catalogue.yaml.

A mutant is rejected at a profile when the checker fails it and some case shows an error
past the allowed one and past what the unpatched adapter shows there: an L2 error above the
allowed (``used > 1``, TOLERANCE.3) or an exact mismatch (ids, inf / NaN positions, a shape,
a crash). Mutants marked ``fp32_only`` lie below bf16 noise and are required at fp32 only.
Where the checker itself rejects the correct adapter, the case is waived with the reason
(KNOWN_CHECKER_ISSUES): the waiver fails the run as soon as the case passes.
``test_separation_table`` prints, per mutant, how far past the allowed error it lands (the
separation margin). Needs PyTorch; slow (about a hundred checker runs): ``pytest -m torch``.
"""

from __future__ import annotations

import functools
import math

import pytest

torch = pytest.importorskip("torch")

from mla_ref.conformance.check import Report, check  # noqa: E402
from mla_ref.golden.cases import case_config, case_definitions  # noqa: E402
from mutants import mutate  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

DTYPES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp8": "fp8"}
MUTANTS = tuple(entry for entry in mutate.catalogue() if entry.get("profile") != "fp8")
FP8_MUTANTS = tuple(entry for entry in mutate.catalogue() if entry.get("profile") == "fp8")  # judged at profile fp8 only
GOLDEN_GAPS = {entry["name"]: entry["golden_gap"] for entry in MUTANTS + FP8_MUTANTS if "golden_gap" in entry}
KNOWN_CHECKER_ISSUES: dict[str, dict[str, str]] = {  # waivers: the case must fail (a waived case that passes fails the run)
    "fp64": {},
    "fp32": {},
    "bf16": {},
    "fp8": {},
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with mutate.one_torch_thread():
        yield


@functools.lru_cache(maxsize=None)
def report(mutant_name: str | None, profile: str) -> Report:
    """The checker's verdict on the adapter (``None``) or one mutant, run in the profile's dtype, without waivers, on the cases
    the mutant's line reaches (catalogue ``reaches``; default every case)."""
    entry = None if mutant_name is None else mutate.mutant(mutant_name)
    return check(mutate.load(entry, DTYPES[profile]), profile=profile, select=(entry or {}).get("reaches"))


def case_strengths(result: Report) -> dict[str, float]:
    """Per case, the largest L2 ``used`` over its compared tensors; inf for an exact mismatch (ids, inf / NaN positions, shape) or a crash."""
    strengths = {}
    for case in result.cases:
        if case.status == "skip":
            continue
        used = math.inf if case.status == "fail" and not case.comparisons else 0.0
        for comparison in case.comparisons:
            exact = not comparison.passed and not comparison.reason.startswith("L2") and "elementwise" not in comparison.reason
            used = max(used, math.inf if exact else comparison.used)
        strengths[case.case_id] = used
    return strengths


def rejections(name: str, profile: str) -> dict[str, float]:
    """The cases where the mutant lands past the allowed error and past what the unpatched adapter shows there."""
    baseline = case_strengths(report(None, profile))
    return {case: used for case, used in case_strengths(report(name, profile)).items() if used > max(1.0, baseline.get(case, 0.0))}


def strongest(name: str, profile: str) -> tuple[float, str]:
    """The mutant's largest error / allowed error and its case (among the cases it breaks, if any; known checker issues aside)."""
    found = rejections(name, profile) or {case: used for case, used in case_strengths(report(name, profile)).items()
                                          if case not in KNOWN_CHECKER_ISSUES[profile]}
    case = max(found, key=found.get)
    return found[case], case


@pytest.mark.parametrize("profile", list(DTYPES))
def test_checker_accepts_the_torch_adapter(profile):
    result = check(mutate.load(None, DTYPES[profile]), profile=profile, waivers=KNOWN_CHECKER_ISSUES.get(profile))
    assert result.failed == [], result.table()


@pytest.mark.parametrize("profile", ["fp32", "bf16"])
def test_checker_accepts_a_float64_rope_table(profile):
    """The adapter builds its RoPE table in float32 like the public engines (the profiles emulate that); one that builds it
    in float64 is more precise and passes too."""
    adapter = mutate.load(None, DTYPES[profile])
    adapter.configure(DTYPES[profile], rope_table="float64")
    result = check(adapter, profile=profile)
    assert result.failed == [], result.table()


@pytest.mark.parametrize("profile", ["fp64", "fp32", "bf16"])  # the tie cases carry no fp8 profile
@pytest.mark.parametrize("variant", mutate.correct_variants(), ids=lambda entry: entry["name"])
def test_checker_accepts_correct_variants(variant, profile):
    """torch.topk's tie order (TOLERANCE.4): accepted in every profile, with the accepted choice noted where it differs
    (a variant's ``select``: the cases it concerns, default the MoE ones)."""
    result = check(mutate.load(variant, DTYPES[profile]), profile=profile, select=variant.get("select", "moe."),
                   waivers=KNOWN_CHECKER_ISSUES.get(profile))
    assert result.failed == [], result.table()
    if "chooses_differently_in" in variant:
        case = next(case for case in result.cases if case.case_id == variant["chooses_differently_in"])
        assert any("margin 0 " in note for note in case.notes), case.notes


@pytest.mark.parametrize("profile", list(DTYPES))
def test_torch_adapter_errors_stay_within_the_allowed_l2(profile):
    over = {case: used for case, used in case_strengths(report(None, profile)).items()
            if used > 1.0 and case not in KNOWN_CHECKER_ISSUES.get(profile, {})}
    assert not over, f"past the allowed error: {over}"


def _mutant_params(profile: str):
    params = []
    for entry in MUTANTS:
        if profile == "bf16" and entry.get("fp32_only"):
            continue
        marks = [pytest.mark.xfail(strict=True, reason=GOLDEN_GAPS[entry["name"]])] if entry["name"] in GOLDEN_GAPS else []
        params.append(pytest.param(entry["name"], marks=marks, id=entry["name"]))
    return params


@pytest.mark.parametrize("name", _mutant_params("fp32"))
def test_checker_rejects_mutant_at_fp32(name):
    assert report(name, "fp32").failed and rejections(name, "fp32"), f"mutant {name} passes fp32"


@pytest.mark.parametrize("name", _mutant_params("bf16"))
def test_checker_rejects_mutant_at_bf16(name):
    assert report(name, "bf16").failed and rejections(name, "bf16"), f"mutant {name} passes bf16"


@pytest.mark.parametrize("name", [pytest.param(entry["name"], id=entry["name"], marks=[pytest.mark.xfail(strict=True, reason=GOLDEN_GAPS[entry["name"]])]
                                               if entry["name"] in GOLDEN_GAPS else []) for entry in FP8_MUTANTS])
def test_checker_rejects_fp8_mutant(name, capsys):
    """Each FP8 mutant fails the fp8 profile in some GC-FP8 case past the allowed error, and a case it breaks blames one of its steps."""
    assert report(name, "fp8").failed and rejections(name, "fp8"), f"mutant {name} passes fp8"
    broken = [case for case in report(name, "fp8").cases if case.case_id in rejections(name, "fp8")]
    crashed = all(case.reason.startswith("adapter raised") for case in broken)
    assert {case.first_divergent_step for case in broken} & set(mutate.mutant(name)["steps"]) or crashed
    if "named_as" in mutate.mutant(name):  # a weight-scale bug the diagnosis names from the outputs alone
        assert any(mutate.mutant(name)["named_as"] in text for case in broken for text in case.diagnosis), [case.diagnosis for case in broken]
    with capsys.disabled():
        print(f"\n{name}: " + ", ".join(f"{case} x{used:.3g}" for case, used in rejections(name, "fp8").items()))


def test_checker_accepts_ue8m0_activation_scales():
    """V3.1 / V3.2's scale_fmt ue8m0 (calibration variant fp8-ue8m0) is a correct FP8 implementation: it passes the fp8 profile."""
    adapter = mutate.load(None, "fp8")
    adapter.SCALE_FMT = "ue8m0"
    result = check(adapter, profile="fp8")
    assert result.failed == [], result.table()


@pytest.mark.parametrize("name", [entry["name"] for entry in MUTANTS if entry["name"] not in GOLDEN_GAPS])
def test_checker_blames_the_mutated_step(name):
    """Some case the mutant breaks names one of its steps as the first divergent one (a crash names none)."""
    broken = [case for case in report(name, "fp32").cases if case.case_id in rejections(name, "fp32")]
    blamed = {case.first_divergent_step for case in broken}
    crashed = all(case.reason.startswith("adapter raised") for case in broken)
    assert blamed & set(mutate.mutant(name)["steps"]) or crashed, f"{name}: the checker blames {sorted(map(str, blamed))}"


def test_separation_table(capsys):
    """Per mutant: its strongest error / allowed error at fp32 and bf16, where, and the step the checker blames there."""
    rows, margins = [], {"fp32": [], "bf16": []}
    for entry in MUTANTS:
        name, cells = entry["name"], []
        for profile in ("fp32", "bf16"):
            used, where = strongest(name, profile)
            if name not in GOLDEN_GAPS and not (profile == "bf16" and entry.get("fp32_only")):
                margins[profile].append((used, name))
            cells.append((used, where))
        blamed = next(case.first_divergent_step for case in report(name, "fp32").cases if case.case_id == cells[0][1])
        note = "golden gap" if name in GOLDEN_GAPS else ("fp32 only" if entry.get("fp32_only") else "")
        rows.append(f"{name:38s} {cells[0][0]:10.3g} {cells[1][0]:10.3g}  {str(blamed):8s} {cells[0][1]:50s} {note}")
    with capsys.disabled():
        print(f"\n{'mutant':38s} {'fp32':>10s} {'bf16':>10s}  {'blamed':8s} {'strongest fp32 case':50s} note")
        print("\n".join(rows))
        for profile, values in margins.items():
            smallest, name = min(values)
            own = max(used for case, used in case_strengths(report(None, profile)).items() if case not in KNOWN_CHECKER_ISSUES[profile])
            print(f"{profile}: smallest separation margin {smallest:.3g} ({name}); the unpatched adapter uses {own:.3f} of the allowed error")
    assert all(used > 1.0 for used, _ in margins["fp32"] + margins["bf16"])


THIN_IN_BF16 = ["mtp_pre_norm_hidden", "group_top2_sum_for_v2", "mscale_applied_once", "mscale_instead_of_mscale_all_dim",
                "rope_layout_ignored", "rope_theta_hard_coded"]  # issue 13 "Coverage": thin or absent separations before


def test_designed_cases_separate_the_thin_bug_classes_by_three(capsys):
    """The bug classes issue 13 found thin in bf16 (or never caught) land >= 3x past the allowed error in fp32 and bf16."""
    weakest = {}
    with capsys.disabled():
        for profile in ("fp32", "bf16"):
            found = {name: strongest(name, profile) for name in THIN_IN_BF16}
            weakest[profile] = min((used, name) for name, (used, _) in found.items())
            print(f"\n{profile}: " + ", ".join(f"{name} x{used:.3g} ({case})" for name, (used, case) in found.items()))
            print(f"{profile}: weakest separation of the designed bug classes x{weakest[profile][0]:.3g} ({weakest[profile][1]})")
    assert all(used >= 3.0 for used, _ in weakest.values()), weakest


@pytest.mark.parametrize("profile", ["fp32", "bf16"])
def test_only_the_half_layout_and_rope_theta_cases_catch_their_bugs(profile):
    """An adapter whose RoPE ignores the layout switch fails the half-layout cases and every DSA case but the FlashMLA
    kernels (the lightning indexer always rotates in halves, DSA.4), and nothing else."""
    sparse_model_cases = {definition["id"] for definition in case_definitions()  # the indexer key cache's kernels rotate nothing
                          if case_config(definition).sparse_attention and definition["level"] != "kernel"}
    assert set(rejections("rope_layout_ignored", profile)) == {"mla.prefill.half/tiny/seed0", "mla.decode.half/tiny/seed0"} | sparse_model_cases
    assert set(rejections("rope_theta_hard_coded", profile)) == {"mla.prefill.theta/tiny-kimi-k2/seed0", "mla.decode.theta/tiny-kimi-k2/seed0"}


COVERED_SECTIONS = ("mla.yaml", "moe.yaml", "model.yaml", "mtp.yaml")
UNCOVERED: dict[str, str] = {}  # step id -> why no mutant of the catalogue declares it (never silently): none


def test_every_spec_step_is_declared_by_a_rejected_mutant():
    """Each step of spec/mla.yaml, moe.yaml, model.yaml and mtp.yaml is declared by a mutant the checker rejects at fp32."""
    from mla_ref.spec import load_spec_file

    step_ids = [step["id"] for name in COVERED_SECTIONS for step in load_spec_file(name)["steps"]]
    assert set(UNCOVERED) <= set(step_ids), f"UNCOVERED names unknown steps: {sorted(set(UNCOVERED) - set(step_ids))}"
    declared: dict[str, list[str]] = {}
    for entry in MUTANTS:
        if entry["name"] in GOLDEN_GAPS:
            continue
        for step in entry["steps"]:
            declared.setdefault(step, []).append(entry["name"])
    missing, stale = [], []
    for step in step_ids:
        rejected = [name for name in declared.get(step, []) if report(name, "fp32").failed and rejections(name, "fp32")]
        if step in UNCOVERED:
            if rejected:
                stale.append(f"{step} (covered by {rejected[0]}: drop it from UNCOVERED)")
        elif not rejected:
            missing.append(f"{step} (declared by {declared.get(step, [])})")
    assert not missing and not stale, f"steps without a rejected mutant: {missing}; stale UNCOVERED entries: {stale}"
