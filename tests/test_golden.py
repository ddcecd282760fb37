"""Golden cases: the committed files regenerate, and stale, orphan, tampered or unsafe files are caught."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mla_ref.errors import GoldenError
from mla_ref.golden.cases import build_case, call_reference, case_definitions, check_case_id, file_name
from mla_ref.golden.generate import default_golden_dir, verify
from mla_ref.golden.manifest import read_manifest
from mla_ref.golden.storage import read_npz, tensor_digest
from mla_ref.precision import UNIT_ROUNDOFF
from mla_ref.spec import load_steps, read_yaml

from conftest import edit_manifest


def test_committed_goldens_regenerate():
    rows = verify()
    failures = [f"{row.case_id}: {row.detail}" for row in rows if row.status != "ok"]
    assert not failures, "\n".join(failures)
    assert len(rows) == len(case_definitions())


def _status(rows, case_id):
    return next(row for row in rows if row.case_id == case_id)


def test_tampered_file_is_caught(golden_copy):
    case_id = "mla.prefill/tiny/seed0"
    path = golden_copy / file_name(case_id)
    tensors = read_npz(path)
    tensors["output:output"] = tensors["output:output"] + 1e-9
    np.savez(path, **tensors)
    row = _status(verify(golden_copy, case_id), case_id)
    assert row.status == "FAIL" and "output:output: sha256 differs from the manifest" in row.detail


def test_missing_file_stale_and_orphan_cases(golden_copy):
    (golden_copy / file_name("moe.route.v2/tiny-v2/seed0")).unlink()
    shutil.copy(golden_copy / file_name("mla.prefill/tiny/seed0"), golden_copy / "leftover.npz")

    def retire(manifest):
        del manifest["cases"]["moe.route.ties/tiny/seed0"]
        manifest["cases"]["mla.retired/tiny/seed0"] = dict(manifest["cases"]["mla.prefill/tiny/seed0"], file="mla.retired__tiny__seed0.npz")
    edit_manifest(golden_copy, retire)
    rows = {row.case_id: row for row in verify(golden_copy, "moe.route")}  # orphans are found whatever the selection
    assert "golden file is missing" in rows.pop("moe.route.v2/tiny-v2/seed0").detail
    assert "orphan file" in rows.pop("leftover.npz").detail
    assert "stale" in rows.pop("moe.route.ties/tiny/seed0").detail
    assert "orphan file" in rows.pop(file_name("moe.route.ties/tiny/seed0")).detail  # its file, no longer listed
    assert "orphan: in the manifest but not in spec/golden.yaml" in rows.pop("mla.retired/tiny/seed0").detail
    assert rows and all(row.status == "ok" and case_id.startswith("moe.route") for case_id, row in rows.items())


ILL_CONDITIONED = ("mla.core.big/*", "mla.decode.long/*", "mla.verify/*")  # large logits, long sums: 140-210 u float64 moves


@pytest.mark.parametrize("coretype", ["Prescott", "Haswell"])
def test_ill_conditioned_cases_verify_under_another_blas_kernel(coretype):
    """The golden was generated under this machine's kernel; no FMA (Prescott) or AVX2 (Haswell) blocks sums otherwise."""
    script = ("import sys; from mla_ref.golden.generate import verify; "
              f"rows = [row for pattern in {ILL_CONDITIONED!r} for row in verify(None, pattern)]; "
              "print('; '.join(f'{r.case_id}: {r.detail}' for r in rows if r.status != 'ok')); sys.exit(any(r.status != 'ok' for r in rows))")
    environment = dict(os.environ, OPENBLAS_CORETYPE=coretype, OPENBLAS_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _rewrite(golden_copy, case_id: str, name: str, change) -> None:
    """Change one stored tensor and record its new digest, as a regenerated file would be."""
    path = golden_copy / file_name(case_id)
    tensors = read_npz(path)
    tensors[name] = change(tensors[name])
    np.savez(path, **tensors)
    edit_manifest(golden_copy, lambda manifest: manifest["cases"][case_id]["tensors"][name].update(sha256=tensor_digest(tensors[name])))


@pytest.mark.parametrize("factor, status", [(0.25, "ok"), (4.0, "FAIL")])
def test_float64_bound_follows_the_fp32_emulations_error(golden_copy, factor, status):
    """64 u x max(|x| + rms, e / u_fp32), e the fp32 emulation's largest error: a change of ``factor`` times the bound."""
    case_id, name = "mla.core.big/tiny/seed0", "output:out"
    entry = read_manifest(golden_copy / "manifest.yaml")["cases"][case_id]
    stored = read_npz(golden_copy / file_name(case_id))[name]
    magnified = entry["profiles"]["fp32"]["noise_max"][name] / UNIT_ROUNDOFF["fp32"]
    rms = np.sqrt(np.mean(np.square(stored)))
    assert magnified > np.abs(stored).max() + rms  # an ill-conditioned tensor: the fp32 error decides its bound
    _rewrite(golden_copy, case_id, name, lambda x: x + factor * 64 * UNIT_ROUNDOFF["fp64"] * magnified)
    row = _status(verify(golden_copy, case_id), case_id)
    assert row.status == status and (status == "ok" or f"{name}: max difference" in row.detail), row.detail


@pytest.mark.parametrize("profile, change, status", [("fp32", 1e-4, "FAIL"), ("bf16", 1e-4, "ok"), ("bf16", 10.0, "FAIL")])
def test_recorded_noise_is_compared_tightly_where_the_emulation_is_deterministic(golden_copy, profile, change, status):
    """fp32 computes in float32 (the same on every machine): a relative change of 1e-4 is caught. bf16 computes in
    float64 and rounds: its noise may move by one flipped rounding (its largest error), not by 10 x the noise."""
    case_id, name = "mla.prefill/tiny/seed0", "output:output"
    edit_manifest(golden_copy, lambda manifest: manifest["cases"][case_id]["profiles"][profile]["noise"].update(
        {name: manifest["cases"][case_id]["profiles"][profile]["noise"][name] * (1 + change)}))
    row = _status(verify(golden_copy, case_id), case_id)
    assert row.status == status and (status == "ok" or f"noise {profile} {name}" in row.detail), row.detail

def test_pickle_inside_a_case_file_is_refused(golden_copy):
    case_id = "moe.route.v2/tiny-v2/seed0"
    np.savez(golden_copy / file_name(case_id), payload=np.array([object()], dtype=object))
    row = _status(verify(golden_copy, case_id), case_id)
    assert row.status == "FAIL" and "refused to load (pickled or object data)" in row.detail


def test_manifest_schema(golden_copy):
    path = golden_copy / "manifest.yaml"
    edit_manifest(golden_copy, lambda manifest: manifest["cases"]["mla.prefill/tiny/seed0"].update(seed="zero"))
    with pytest.raises(GoldenError, match=r"mla.prefill/tiny/seed0: seed: expected int, got str"):
        read_manifest(path)
    path.write_text("schema: something-else\n")
    with pytest.raises(GoldenError, match="expected schema 'mla-ref-golden-manifest/1'"):
        read_manifest(path)


def test_model_cases_store_the_recipe_of_their_weights_and_export_them_in_full(golden_copy, tmp_path):
    """The weights of a model-level case are rebuilt from seed and design, checked by digest; the export writes them out."""
    from mla_ref.conformance.check import check, load_case
    from mla_ref.conformance import reference_adapter
    from mla_ref.golden.generate import export
    from mla_ref.golden.storage import read_safetensors
    case_id = "model.logits/tiny/seed0"
    entry = read_manifest(golden_copy / "manifest.yaml")["cases"][case_id]
    assert entry["weights"]["design"] == "none" and not any(name.startswith("weight:") for name in read_npz(golden_copy / entry["file"]))
    weights = load_case(golden_copy, entry)["weight"]
    assert "lm_head.weight" in weights and len(weights) > 20
    assert export(golden_copy, tmp_path / "out", case_id) == 1
    exported, _ = read_safetensors(tmp_path / "out" / entry["file"].replace(".npz", ".safetensors"))
    assert np.array_equal(exported["weight:lm_head.weight"], weights["lm_head.weight"])
    # weights other than the ones the truth was computed with
    edit_manifest(golden_copy, lambda manifest: manifest["cases"][case_id]["weights"].update(digest="0" * 64))
    with pytest.raises(GoldenError, match="differ from the manifest's digest"):  # a golden problem, never the adapter's failure
        check(reference_adapter, "fp64", case_id, directory=golden_copy)
    edit_manifest(golden_copy, lambda manifest: manifest["cases"][case_id]["weights"].update(seed=1))  # a recipe other than the definition's
    with pytest.raises(GoldenError, match=r"model.logits/tiny/seed0: weights.seed: manifest 1, spec 0"):
        check(reference_adapter, "fp64", case_id, directory=golden_copy)
    row = _status(verify(golden_copy, case_id), case_id)
    assert row.status == "FAIL" and "weights recipe: manifest" in row.detail and "weights.seed: manifest 1, spec 0" in row.detail


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a\\b", "Upper/case", "a//b", ""])
def test_case_ids_cannot_escape_the_folder(bad):
    with pytest.raises(GoldenError, match="case id"):
        check_case_id(bad)


def test_every_computational_step_has_a_golden_case():
    covered = {step for definition in case_definitions() for step in definition["steps"]}
    for file in ("mla.yaml", "moe.yaml", "model.yaml", "mtp.yaml"):
        for step in load_steps(file):
            if step["id"] in UNCOVERED:
                continue
            assert step["id"] in covered, f"{step['id']} has no golden case in spec/golden.yaml"


# Steps without a golden case, listed here and never silently: none.
UNCOVERED: set[str] = set()


def test_designed_inputs_do_what_they_claim():
    ties = build_case(next(d for d in case_definitions() if d["id"] == "moe.route.ties/tiny/seed0"))
    ids = ties.outputs["expert_ids"]
    assert list(ids[0][:2]) == [0, 1], "duplicated experts 0 and 1 tie exactly: the lower index comes first"
    core = build_case(next(d for d in case_definitions() if d["id"] == "mla.core.paged/tiny/bs16-seed0"))
    cache, table, lengths = core.inputs["k_cache"], core.inputs["block_table"], core.inputs["cache_seqlens"]
    for b, length in enumerate(lengths):
        canary = cache[table[b, length // 16], length % 16, 0]
        assert np.isfinite(canary).all() and np.linalg.norm(canary) == pytest.approx(50.0)
    assert np.isnan(cache).any() and np.isfinite(core.outputs["out"]).all()
    v3 = build_case(next(d for d in case_definitions() if d["id"] == "moe.route.v3/tiny/seed0"))
    assert v3.steps["MOE.7/expert_margin"].min() > 0.02 and v3.steps["MOE.5/group_margin"].min() > 0.02
    assert (v3.weights["mlp.gate.e_score_correction_bias"] < 0).any()


def _committed(case_id: str) -> dict[str, np.ndarray]:
    return read_npz(default_golden_dir() / file_name(case_id))


def test_the_accepting_speculative_case_accepts_some_drafts_and_rejects_others():
    """The designed echo weights must make the MTP drafts matter: full, partial and no acceptance all occur."""
    case = _committed("mtp.speculative.accepting/tiny-echo/seed0")
    accepted, proposed = case["output:accepted_per_depth"], case["output:proposed_per_depth"]
    assert 0 < accepted[0] < proposed[0], "some steps reject d_1, others accept it"
    assert accepted[-1] > 0, "some steps accept all D drafts"
    plain = _committed("mtp.speculative/tiny-dense/seed0")
    assert plain["output:accepted_per_depth"].sum() == 0, "random weights accept nothing: the reason the echo case exists"


def test_the_reuse_schemes_draft_differently():
    """Recurrent and modulo reuse of one module agree on d_1 and differ after (else the recurrent case tests nothing new)."""
    recurrent = build_case(next(d for d in case_definitions() if d["id"] == "mtp.draft.recurrent/tiny-dense/seed0"))
    assert recurrent.config.mtp_module_reuse == "recurrent"
    recurrent.config = recurrent.config.replace(mtp_module_reuse="modulo")
    modulo = call_reference(recurrent, None)
    assert np.array_equal(modulo["logits"][:, 0], recurrent.outputs["logits"][:, 0])
    assert np.abs(modulo["logits"][:, 1:] - recurrent.outputs["logits"][:, 1:]).max() > 1e-3


def test_on_demand_cases_are_not_committed_and_build_with_one_command(tmp_path):
    """DeepSeek-V3 and V3.2-shape cases: defined in spec/golden.yaml, absent from golden/, built by `golden generate --on-demand`."""
    from mla_ref.cli import main
    from mla_ref.conformance import reference_adapter
    from mla_ref.conformance.check import check
    on_demand = case_definitions(on_demand=True)
    assert {d["preset"] for d in on_demand} == {"deepseek-v3", "deepseek-v3.2"} and len(on_demand) >= 6
    assert not set(read_manifest(default_golden_dir() / "manifest.yaml")["cases"]) & {d["id"] for d in on_demand}
    assert main(["golden", "generate", "--on-demand", "--select", "moe.route.v3/deepseek-v3*", "--dir", str(tmp_path)]) == 0
    assert read_manifest(tmp_path / "manifest.yaml")["on_demand"] is True
    rows = verify(tmp_path)
    assert [(row.case_id, row.status) for row in rows] == [("moe.route.v3/deepseek-v3/seed0", "ok")]
    report = check(reference_adapter, "bf16", directory=tmp_path)
    assert report.ok and report.count("pass") == 1


HEAVY_ON_DEMAND = ("mla.prefill.fp8/deepseek-v3/seed0", "dsa.indexer/deepseek-v3.2/seed0", "dsa.prefill/deepseek-v3.2/seed0",
                   "dsa.extend.chunked/deepseek-v3.2/seed0")


def _on_demand_groups() -> list:
    """The on-demand cases in two groups: the V3 cases of the CI slow step, and the FP8 and V3.2 ones (each about 10 minutes
    and up to 12.6 GB to build, twice with verify) marked heavy: run by hand with ``pytest -m heavy -n 0``."""
    ids = [definition["id"] for definition in case_definitions(on_demand=True) if definition.get("on_demand")]
    light = [case_id for case_id in ids if case_id not in HEAVY_ON_DEMAND]
    heavy = [case_id for case_id in ids if case_id in HEAVY_ON_DEMAND]
    return [pytest.param(light, id="v3"), pytest.param(heavy, id="fp8-and-v3.2", marks=pytest.mark.heavy)]


DSA_LAYER_ENTRY_POINTS = ("dsa_indexer", "dsa_prefill", "dsa_extend")


def _clear_selections(folder, definition: dict) -> int:
    """GC-DSA, checked rather than assumed: rebuilt from a built case's stored inputs, every query of a DSA layer case that
    sees more than index_topk keys has a gap of more than ``min_margin`` x its largest |score| between its k-th and
    (k+1)-th scores in the float64 truth, and more than half that in every profile's emulation (the fp8 one quantises the
    indexer's q and k, DSA.6); a designed tie (layout tie_positions, GC-DSA-TIES) is instead within max_near_margin in the
    float64 truth. Returns how many queries select with a clear gap."""
    from mla_ref.conformance.check import load_case
    from mla_ref.golden.cases import Case, case_args, case_config, profiles_of, selection_margins
    from mla_ref.trace import Trace
    parts = load_case(folder, read_manifest(folder / "manifest.yaml")["cases"][definition["id"]])
    config = case_config(definition)
    case = Case(definition["id"], definition, config, case_args(definition, config), parts["input"], parts["weight"])
    least = definition["layout"].get("min_margin", 0.06)
    ties = definition["layout"].get("tie_positions", {})
    tied = [*ties.get("exact", []), *ties.get("near", [])]  # query positions of every sequence
    selecting = None
    for profile in [None, *profiles_of(definition)]:
        trace = Trace(profile)
        call_reference(case, trace)
        margins = selection_margins(trace["DSA.9"]["masked_scores"], config.index_topk)  # [batch, seq], inf: keeps every key
        selecting = np.isfinite(margins) if selecting is None else selecting
        assert np.array_equal(np.isfinite(margins), selecting), profile
        clear = selecting.copy()
        clear[:, tied] = False
        assert np.all(margins[clear] > (least if profile is None else least / 2)), (profile, np.min(margins[clear]))
        if profile is None and tied:
            assert np.all(margins[:, tied] <= definition["layout"]["max_near_margin"]), margins[:, tied]
    return int(clear.sum())


@pytest.mark.slow  # 7 emulations of 4 cases: several seconds
def test_committed_dsa_selections_keep_their_margin():
    committed = [definition for definition in case_definitions() if definition["entry_point"] in DSA_LAYER_ENTRY_POINTS]
    assert len(committed) >= 4
    for definition in committed:
        assert _clear_selections(default_golden_dir(), definition) >= 1, definition["id"]


@pytest.mark.slow
@pytest.mark.parametrize("case_ids", _on_demand_groups())
def test_every_on_demand_case_builds_verifies_and_passes_the_reference_and_the_torch_adapter(tmp_path, case_ids):
    """The V3 attention cases rebuild their 187M weights from the recipe (about 2 minutes, 6 GB). Our torch adapter must
    pass them in every profile they carry: at these shapes a correct fp32 run once used 110% of the allowance (long fp32 sums)."""
    from mla_ref.conformance import reference_adapter
    from mla_ref.conformance.check import check
    from mla_ref.golden.cases import profiles_of
    from mla_ref.golden.generate import generate
    for case_id in case_ids:
        generate(tmp_path, case_id, on_demand=True)
    problems = [f"{row.case_id}: {row.detail}" for row in verify(tmp_path) if row.status != "ok"]
    assert not problems, problems
    built = {definition["id"]: definition for definition in case_definitions(on_demand=True) if definition["id"] in case_ids}

    for case_id, definition in built.items():
        if definition["entry_point"] in DSA_LAYER_ENTRY_POINTS:
            assert _clear_selections(tmp_path, definition) >= 1, case_id

    def carrying(profile):
        return [case_id for case_id, definition in built.items() if profile in profiles_of(definition)]
    for profile in ("fp32", "fp8"):
        if carrying(profile):
            assert check(reference_adapter, profile, directory=tmp_path).ok
    import independent_fp64_adapter  # RoPE by theta ** (-2j/d) and exp(i angle): 746% of the fixed fp64 floor at V3 prefill
    independent = [case_id for case_id in carrying("fp64") if hasattr(independent_fp64_adapter, built[case_id]["entry_point"])]
    if independent:  # it implements MLA only (no moe_route, no dsa_*): a folder of DSA cases alone it cannot run
        report = check(independent_fp64_adapter, "fp64", directory=tmp_path)
        assert report.ok and report.count("pass") == len(independent), report.table()
    try:
        import torch  # noqa: F401 - the CI slow step installs it
    except ImportError:
        return
    from mutants import mutate
    for dtype, profile in (("float32", "fp32"), ("bfloat16", "bf16"), ("fp8", "fp8")):
        if carrying(profile):
            report = check(mutate.load(None, dtype), profile, directory=tmp_path)
            assert report.ok and report.count("pass") == len(carrying(profile)), report.table()


def test_a_built_case_records_the_emulations_own_error_as_its_noise():
    """noise = ||emulated - truth||_2 and noise_max = max |emulated - truth| per profile and tensor (verify compares
    only the L2 noise with the manifest: the largest element error is checked here, on a freshly built case)."""
    definition = next(d for d in case_definitions() if d["id"] == "mla.core.paged/tiny/bs1-seed0")
    case = build_case(definition)
    checked = 0
    for profile, emulated in case.emulated.items():
        if profile == "fp64":  # its noise is the fp32 emulation's, scaled (TOLERANCE.2 noise_from: tests/test_checker.py)
            continue
        for name, value in emulated.items():
            finite = np.isfinite(case.outputs[name])  # lse is -inf on rows that see no key, in the emulation too
            assert np.array_equal(np.isfinite(value), finite), (profile, name)
            error = value[finite] - case.outputs[name][finite]
            assert case.noise[profile][f"output:{name}"] == pytest.approx(float(np.sqrt(np.sum(error * error))), rel=1e-12), (profile, name)
            assert case.noise_max[profile][f"output:{name}"] == float(np.max(np.abs(error), initial=0.0)), (profile, name)
            checked += profile != "fp64"
    assert checked >= 8


@functools.lru_cache(maxsize=None)
def _committed_manifest() -> dict:
    return read_yaml(default_golden_dir() / "manifest.yaml")


def _one_case_manifest(folder, case_id: str = "mla.prefill/tiny/seed0") -> tuple[dict, object]:
    """The committed manifest (parsed once per run) cut to one case, and where to write it in ``folder``."""
    committed = _committed_manifest()
    document = {**committed, "cases": {case_id: copy.deepcopy(committed["cases"][case_id])}}
    return document, folder / "manifest.yaml"


@pytest.mark.parametrize("edit, message", [
    (lambda d, e: d.pop("numpy_version"), "manifest.yaml: numpy_version: required key is missing"),
    (lambda d, e: d.update(cases=[1]), "manifest.yaml: cases: expected a mapping case id -> entry"),
    (lambda d, e: d["cases"].update({"mla.prefill/tiny/seed0": "not a mapping"}), "mla.prefill/tiny/seed0: manifest entry is not a mapping"),
    (lambda d, e: e.update(file="other.npz"), "mla.prefill/tiny/seed0: file: expected 'mla.prefill__tiny__seed0.npz', got 'other.npz'"),
    (lambda d, e: e.update(weights={"generator": "x", "seed": 0, "design": "y"}), r"weights.digest: expected str \(the recipe"),
    (lambda d, e: e["tensors"]["output:output"].update(sha256=None), "tensors.output:output.sha256: expected str"),
])
def test_every_manifest_schema_violation_is_named(tmp_path, edit, message):
    document, path = _one_case_manifest(tmp_path)
    edit(document, document["cases"]["mla.prefill/tiny/seed0"])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(GoldenError, match=message):
        read_manifest(path)


def test_verify_names_a_stale_spec_version_a_wrong_noise_and_a_file_that_disagrees_with_its_manifest(golden_copy):
    case_id = "mla.core.paged/tiny/bs1-seed0"
    document, path = _one_case_manifest(golden_copy, case_id)
    document["spec_version"] = "0.0.1"
    entry = document["cases"][case_id]
    entry["profiles"]["bf16"]["noise"]["output:out"] *= 3  # beyond one flipped rounding (the largest error), which verify allows
    entry["tensors"]["output:ghost"] = dict(entry["tensors"]["output:out"])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    rows = {row.case_id: row for row in verify(golden_copy, case_id)}
    assert rows["manifest"].status == "FAIL" and "spec_version '0.0.1'" in rows["manifest"].detail
    detail = rows[case_id].detail
    assert "tensors in the file ['output:ghost'] disagree with the manifest" in detail and "noise bf16 output:out: manifest" in detail, detail


def test_verify_names_a_rebuilt_tensor_of_another_shape_or_with_moved_infinities():
    from mla_ref.golden.generate import _close
    truth = np.array([1.0, -np.inf, 2.0])
    assert "stored float64 [3], rebuilt float64 [1, 3]" in _close("output:lse", truth, truth[None])
    assert "NaN / inf positions differ" in _close("output:lse", truth, np.array([1.0, 0.0, 2.0]))
    assert _close("output:lse", truth, truth.copy()) == ""


def test_a_duplicate_case_id_in_the_spec_is_refused(monkeypatch):
    from mla_ref.golden import cases
    spec = {"cases": [{"id": "mla.prefill/tiny/seed0"}, {"id": "mla.prefill/tiny/seed0"}]}
    monkeypatch.setattr(cases, "load_spec_file", lambda name: spec)
    with pytest.raises(GoldenError, match="mla.prefill/tiny/seed0: duplicate case id in spec/golden.yaml"):
        cases.case_definitions()
