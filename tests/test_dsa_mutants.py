"""The torch adapter's DeepSeek Sparse Attention (issue 17) under the checker, in fp32 and bf16: it passes the DSA
cases, and every DSA mutant of tests/mutants/catalogue.yaml is rejected there.

Besides "rejected", what each bug can show follows from the maths, not from our own output:
- the head weights without index_n_heads^-0.5 and the scores without index_head_dim^-0.5 multiply every index
  score by a positive constant: the selection and all after it are unchanged, so only dsa.indexer (which returns
  the scores) catches them, and its scores are sqrt(index_n_heads), resp. sqrt(index_head_dim), x the truth;
- the Hadamard missing on both sides leaves every q.k unchanged (H is orthonormal): only the cases that read
  cached indexer keys (dsa.extend.*, written with the Hadamard) catch it from outputs; dsa.indexer from DSA.5;
- a dense layer equals the sparse one while a query sees at most index_topk keys, and the DSA cases go past that.
Needs PyTorch; slow.
"""

from __future__ import annotations

import functools
import math
import types

import pytest

torch = pytest.importorskip("torch")

from mla_ref.config import load_preset  # noqa: E402
from mla_ref.conformance.check import Report, check, read_manifest  # noqa: E402
from mla_ref.golden.cases import case_definitions  # noqa: E402
from mla_ref.conformance.protocol import entry_points  # noqa: E402
from mutants import mutate  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DSA = "dsa."
MUTANTS = [entry["name"] for entry in mutate.catalogue() if entry.get("reaches") == DSA]
INDEX_CACHE = "dsa.index_"  # the indexer's FP8 key cache cases (DSA.15-DSA.18) and the mutants of its writer and reader
INDEX_CACHE_NAMES = {  # mutant -> the name its diagnosis gives first in every case it fails, from outputs alone
    "dsa_index_cache_codes_read_as_fnuz": "indexer K cache codes read as e4m3fnuz",
    "dsa_index_cache_scale_fnuz_range": "indexer K cache scales from the FNUZ range",
    "dsa_index_cache_interleaved": "indexer K cache record token-interleaved",
}
INDEXER, CHUNKED, DECODE = "dsa.indexer/tiny-dsa/seed0", "dsa.extend.chunked/tiny-dsa/seed0", "dsa.extend.decode/tiny-dsa/seed0"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with mutate.one_torch_thread():
        yield


def outputs_only(module) -> types.SimpleNamespace:
    """The adapter with every returned intermediate (``STEP/name``) dropped, as most kernels return."""
    def stripped(function):
        return lambda *args, **kwargs: {name: value for name, value in function(*args, **kwargs).items() if "/" not in name}
    return types.SimpleNamespace(**{point: stripped(getattr(module, point)) for point in entry_points() if hasattr(module, point)})


@functools.lru_cache(maxsize=None)
def report(name: str | None, profile: str, intermediates: bool = True) -> Report:
    """The checker on the DSA cases, for the adapter (``None``) or one mutant, in the profile's dtype."""
    module = mutate.load(None if name is None else mutate.mutant(name), DTYPES[profile])
    return check(module if intermediates else outputs_only(module), profile=profile, select=DSA)


def strengths(result: Report) -> dict[str, float]:
    """Per case: the largest L2 share of the allowed error; inf for an exact mismatch (indices, inf positions) or a crash."""
    return {case.case_id: case.used for case in result.cases}


def rejections(name: str, profile: str, intermediates: bool = True) -> dict[str, float]:
    """The DSA cases the mutant fails past the allowed error and past the unpatched adapter there."""
    baseline = strengths(report(None, profile, intermediates))
    failed = {case.case_id for case in report(name, profile, intermediates).cases if case.status == "fail"}
    return {case: used for case, used in strengths(report(name, profile, intermediates)).items()
            if case in failed and used > max(1.0, baseline[case])}


def cases_storing(kind: str, name: str) -> set[str]:
    """The DSA cases whose golden holds an output ``name`` (kind "output") or intermediates of step ``name`` (kind "step")."""
    from mla_ref.golden.generate import default_golden_dir
    manifest = read_manifest(default_golden_dir() / "manifest.yaml")["cases"]
    return {case_id for case_id, entry in manifest.items() if case_id.startswith("dsa.")
            and (name in entry_points()[entry["entry_point"]]["output_steps"] if kind == "output" else name in entry["steps"])}


def l2_multiple(name: str, profile: str) -> float:
    """The mutant's largest finite L2 error / allowed error over the DSA cases' float tensors (exact mismatches aside)."""
    return max((c.used for case in report(name, profile).cases for c in case.comparisons
                if c.used is not None and math.isfinite(c.used)), default=0.0)


def test_the_catalogue_holds_the_dsa_bug_classes_of_issue_17():
    assert len(MUTANTS) >= 12
    assert all(len(mutate.mutant(name)["steps"]) and not mutate.mutant(name).get("fp32_only") for name in MUTANTS)


@pytest.mark.parametrize("profile", list(DTYPES))
def test_the_adapter_passes_every_dsa_case(profile, capsys):
    result = report(None, profile)
    assert len(result.cases) >= 6 and result.failed == [] and result.count("unsupported") == 0, result.table()
    worst = max(result.cases, key=lambda case: case.used)
    with capsys.disabled():
        print(f"\n{profile}: DSA cases pass, largest share of the allowed error {100 * worst.used:.1f}% ({worst.case_id})")


@pytest.mark.parametrize("profile", list(DTYPES))
@pytest.mark.parametrize("name", MUTANTS)
def test_every_dsa_mutant_is_rejected(name, profile):
    assert report(name, profile).failed and rejections(name, profile), f"{name} passes the DSA cases at {profile}"


@pytest.mark.parametrize("profile", list(DTYPES))
@pytest.mark.parametrize("name, heads_or_dim", [("dsa_head_weights_unscaled", "index_n_heads"), ("dsa_index_scale_missing", "index_head_dim")])
def test_score_scale_bugs_show_only_in_the_indexer_scores(name, heads_or_dim, profile):
    """A uniform scale of the index scores leaves every selection, output and logit alone: only the scores show it, as an
    output (dsa.indexer) or as the DSA.9 intermediate the layer cases store; the diagnosis measures the factor."""
    factor = math.sqrt(getattr(load_preset("tiny-dsa"), heads_or_dim))
    assert INDEXER in rejections(name, profile, intermediates=False)
    assert set(rejections(name, profile, intermediates=False)) <= cases_storing("output", "scores")
    assert set(rejections(name, profile)) <= cases_storing("output", "scores") | cases_storing("step", "DSA.9")
    case = next(case for case in report(name, profile, intermediates=False).cases if case.case_id == INDEXER)
    ratio = float(case.diagnosis[0].removeprefix("scores is ").split(" x the truth")[0]) if case.diagnosis else math.nan
    assert case.status == "fail" and abs(ratio / factor - 1) < 1e-2, case.diagnosis


@pytest.mark.parametrize("profile", list(DTYPES))
def test_a_hadamard_missing_on_both_sides_shows_through_the_cached_keys(profile):
    """(Hq).(Hk) = q.k: from outputs alone only the cases whose keys come from a cache (dsa_extend) see it; with the
    intermediates, q_hat and k_hat show it wherever they are stored."""
    extend_cases = {definition["id"] for definition in case_definitions() if definition["entry_point"] == "dsa_extend"}
    outputs_only = set(rejections("dsa_hadamard_missing", profile, intermediates=False))
    assert {CHUNKED, DECODE} <= outputs_only <= extend_cases
    assert outputs_only | {INDEXER} <= set(rejections("dsa_hadamard_missing", profile)) <= extend_cases | cases_storing("step", "DSA.5") | cases_storing("step", "DSA.6")


ONE_SIDE = "Hadamard on one side of the index scores only"
NAMES = {  # mutant -> (the name its diagnosis must give first in some failing case, other names a case may give first)
    "dsa_indexer_rope_interleaved": ("indexer RoPE in interleaved pairs", ()),
    "dsa_indexer_rope_nope_first": ("indexer RoPE on the last qk_rope_head_dim dims", ()),
    "dsa_hadamard_missing_on_q": ("Hadamard missing on the index queries", (ONE_SIDE,)),  # the side shows through cached keys only
    "dsa_hadamard_missing_on_k": ("Hadamard missing on the new index keys", (ONE_SIDE,)),
    "dsa_hadamard_missing": ("Hadamard missing on both index queries and new keys", ()),
    "dsa_relu_after_head_weights": ("ReLU after the index head weights", ()),
    "dsa_head_weights_unscaled": ("indexer head weights without index_n_heads^-0.5", ()),
    "dsa_index_scale_missing": ("index scores without index_head_dim^-0.5", ()),
    "dsa_topk_over_future_keys": ("no causal mask before the indexer's top-k", ()),
    "dsa_topk_not_clamped": ("not clamped to the visible keys", ()),
    "dsa_prefill_dense": ("dense attention: the indexer's selection ignored", ()),
    "dsa_extend_dense": ("dense attention: the indexer's selection ignored", ()),
}


def test_every_dsa_mutant_has_an_expected_name():
    assert set(NAMES) == set(MUTANTS)


@pytest.mark.parametrize("name", MUTANTS)
def test_dsa_bug_is_named_from_outputs_alone(name):
    """From outputs alone (fp32) some failing case names the bug first, and no failing case names another bug."""
    expected, also = NAMES[name]
    failed = [case for case in report(name, "fp32", intermediates=False).cases if case.status == "fail"]
    firsts = {case.case_id: case.diagnosis[0] if case.diagnosis else "" for case in failed}
    assert any(expected in first for first in firsts.values()), firsts
    wrong = {case: first for case, first in firsts.items()
             if not (first.startswith("no known pattern") or any(text in first for text in (expected, *also)))}
    assert not wrong, wrong


def test_dsa_separation_table(capsys):
    """Per DSA mutant and profile: cases rejected, the largest finite L2 multiple of the allowance, exact mismatches, and
    the first name the diagnosis gives from outputs alone (fp32)."""
    rows = []
    for name in MUTANTS:
        cells = []
        for profile in DTYPES:
            rejected = rejections(name, profile)
            exact = sum(math.isinf(used) for used in rejected.values())
            cells.append(f"{len(rejected)} cases x{l2_multiple(name, profile):<9.3g} exact {exact}")
        failed = [case for case in report(name, "fp32", intermediates=False).cases if case.status == "fail"]
        names = [text for case in failed for text in case.diagnosis if not text.startswith("no known pattern")]
        rows.append(f"{name:30s} {cells[0]:32s} {cells[1]:32s} {names[0][:70] if names else 'no known pattern'}")
    with capsys.disabled():
        print(f"\n{'DSA mutant':30s} {'fp32':32s} {'bf16':32s} outputs-only diagnosis (fp32)")
        print("\n".join(rows))
    assert all(rejections(name, profile) for name in MUTANTS for profile in DTYPES)


def test_the_index_cache_mutants_are_catalogued():
    assert {entry["name"] for entry in mutate.catalogue() if entry.get("reaches") == INDEX_CACHE} == set(INDEX_CACHE_NAMES)


@pytest.mark.parametrize("profile", list(DTYPES))
@pytest.mark.parametrize("name", sorted(INDEX_CACHE_NAMES))
def test_every_index_cache_mutant_is_rejected_and_named_from_outputs_alone(name, profile):
    """A writer bug changes bytes (an exact mismatch in every profile), the FNUZ reader halves every logit and turns the key
    with a -0 code into NaN; the diagnosis reruns the reference with the bug and names it in every case that fails."""
    module = outputs_only(mutate.load(mutate.mutant(name), DTYPES[profile]))
    failed = [case for case in check(module, profile=profile, select=INDEX_CACHE).cases if case.status == "fail"]
    assert failed and all(case.diagnosis and INDEX_CACHE_NAMES[name] in case.diagnosis[0] for case in failed), \
        {case.case_id: case.diagnosis for case in failed}
