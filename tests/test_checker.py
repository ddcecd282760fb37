"""The checker: accepts the reference at every profile, rejects and names known bugs, survives broken adapters."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from mla_ref.cli import main
from mla_ref.conformance import reference_adapter as ref
from mla_ref.conformance.check import check
from mla_ref.errors import InputError
from mla_ref.golden.cases import case_definitions


@pytest.mark.parametrize("profile", ["fp64", "fp32", "tf32", "bf16", "fp16"])
def test_reference_passes_every_case(profile):
    report = check(ref, profile)
    assert report.ok and report.count("pass") >= 20, report.table()


def adapter(**functions) -> types.SimpleNamespace:
    return types.SimpleNamespace(**functions)


def run(candidate, select, profile="bf16"):
    report = check(candidate, profile, select)
    assert report.cases, select
    return report


def test_mscale_all_dim_read_as_zero_is_named():
    """A config read without mscale_all_dim (A11): no m^2 and cos/sin times mscale(s, mscale), not the plain missing m^2
    (tests/test_diagnose_variants.py builds that one)."""
    candidate = adapter(mla_prefill=lambda config, weights, hidden, start_positions:
                        ref.mla_prefill(dict(config, mscale_all_dim=0.0), weights, hidden, start_positions))
    report = run(candidate, "mla.prefill.yarn/tiny-yarn/")
    case = report.cases[0]
    assert case.status == "fail" and "mscale_all_dim read as 0" in case.diagnosis[0], case.diagnosis


def test_lse_base_two_is_named():
    def core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
        result = ref.latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return {"out": result["out"], "lse": result["lse"] * np.log2(np.e)}
    case = run(adapter(latent_attention_core=core), "mla.core.paged/tiny/bs16").cases[0]
    assert case.status == "fail" and "LSE in base 2" in " ".join(case.diagnosis)


def test_visible_canary_is_caught_and_named():
    def core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
        return ref.latent_attention_core(q, np.nan_to_num(k_cache), block_table, np.asarray(cache_seqlens) + 1, head_dim_v, softmax_scale, causal)
    case = run(adapter(latent_attention_core=core), "mla.core.paged/tiny/bs16").cases[0]
    assert case.status == "fail" and "canary" in " ".join(case.diagnosis)


def test_rope_layout_mixup_is_named_at_the_first_divergent_step():
    def prefill(config, weights, hidden, start_positions):
        from mla_ref import Trace
        trace = Trace()
        result = ref.mla_prefill(dict(config, rope_layout="half"), weights, hidden, start_positions, trace=trace)
        return {**result, "MLA.2/q_nope": trace["MLA.2"]["q_nope"], "MLA.4/q_pe": trace["MLA.4"]["q_pe"]}
    report = run(adapter(mla_prefill=prefill), "mla.prefill/tiny/seed0")
    case = report.cases[0]
    assert case.status == "fail" and case.first_divergent_step == "MLA.4" and "first divergent step MLA.4;" in report.table()
    assert "RoPE pairs in the other layout" in " ".join(case.diagnosis)


def test_bias_in_the_routing_weights_is_caught():
    def route(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        from mla_ref.config import from_dict
        from mla_ref.moe import route as reference_route
        routing = reference_route(from_dict(config), weights, hidden)
        biased = np.take_along_axis(routing.selection, routing.expert_ids, axis=-1)
        return {"expert_ids": result["expert_ids"], "weights": biased / biased.sum(-1, keepdims=True) * config["routed_scaling_factor"]}
    case = run(adapter(moe_route=route), "moe.route.v3/").cases[0]
    assert case.status == "fail" and "e_score_correction_bias added to the routing weights" in " ".join(case.diagnosis)


@pytest.mark.parametrize("shift, named", [(-1, "off by one (-1)"), (+1, "off by one (+1)"), ("top-left", "aligned top-left")])
def test_shifted_causal_masks_of_the_kernel_are_named(shift, named):
    """A kernel whose causal diagonal moved (computed here from mla_ref's own steps, not through the diagnosis)."""
    from mla_ref.cache import gather_paged_rows
    from mla_ref.mla import causal_visibility, latent_attention

    def core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
        batch, s_q = q.shape[:2]
        rows = gather_paged_rows(k_cache, block_table, cache_seqlens)
        offsets = np.zeros(batch, np.int64) if shift == "top-left" else cache_seqlens - s_q + shift
        visible = causal_visibility(offsets, np.full(batch, s_q), s_q, rows.shape[1])
        visible &= np.arange(rows.shape[1])[None, None, :] < cache_seqlens[:, None, None]
        out, lse = latent_attention(q, rows, visible, softmax_scale, head_dim_v)
        return {"out": out, "lse": lse}
    case = run(adapter(latent_attention_core=core), "mla.core.verify/tiny/sq4").cases[0]
    assert case.status == "fail" and case.first_divergent_step in ("MLA.8", "MLA.17")
    assert named in " ".join(case.diagnosis), case.diagnosis


def test_scalar_losses_get_no_constant_factor_signature():
    """A scalar is always a multiple of the truth: a wrong loss must not be blamed on a scale bug."""
    from mla_ref.conformance.diagnose import signature
    from mla_ref.config import load_config
    assert signature("mtp_loss", np.array(1.05), np.array(1.0), load_config("tiny")) == []
    assert "1.0500 x the truth" in signature("lse", np.full(8, 1.05), np.ones(8), load_config("tiny"))[0]


@pytest.mark.parametrize("broken, reason", [
    (lambda *a: (_ for _ in ()).throw(RuntimeError("kernel exploded")), "adapter raised RuntimeError: kernel exploded"),
    (lambda *a: [1, 2, 3], "adapter returned list, expected a dict of arrays"),
    (lambda *a: {"out": np.zeros(3)}, "missing outputs ['lse']"),
    (lambda *a: {"out": np.zeros((1, 1)), "lse": np.zeros((1, 1))}, "shape [1, 1], expected"),
    (lambda *a: {"out": np.full((3, 1, 4, 32), np.nan), "lse": np.zeros((3, 4, 1))}, "NaN/inf positions differ"),
])
def test_a_broken_adapter_fails_its_cases_without_crashing(broken, reason):
    report = run(adapter(latent_attention_core=broken), "mla.core.paged/tiny/bs1")
    assert report.cases[0].status == "fail" and reason in report.cases[0].reason
    assert report.cases[0].used > 1, "a failing case never reports headroom"


def test_missing_entry_points_are_skipped_and_counted():
    report = check(adapter(moe_route=ref.moe_route), "fp32", "moe.")
    skipped = [case for case in report.cases if case.status == "skip"]
    assert report.ok and report.count("pass") >= 3 and skipped and "skipped" in report.summary()
    assert all(case.entry_point != "moe_route" and "adapter has no entry point" in case.reason for case in skipped)


def test_waivers_and_unexpected_passes():
    bad = adapter(moe_route=lambda config, weights, hidden: ref.moe_route(dict(config, group_mask_fill="zero"), weights, hidden))
    waived = check(bad, "fp32", "moe.route.v3", waivers={"moe.route.v3/*": "known 0.0 fill, issue 99"})
    assert waived.ok and waived.cases[0].status == "waived"
    xpass = check(ref, "fp32", "moe.route.v3", waivers={"moe.route.v3/*": "known 0.0 fill, issue 99"})
    assert not xpass.ok and xpass.cases[0].status == "xpass"


def test_unknown_profile_and_bad_adapter_name():
    with pytest.raises(InputError, match="unknown profile 'bf8'"):
        check(ref, "bf8")
    with pytest.raises(InputError, match="cannot import 'no_such_adapter_module'"):
        check("no_such_adapter_module", "fp32")


def test_cli_check_report_and_exit_codes(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["check", "mla_ref.conformance.reference_adapter", "--profile", "bf16", "--select", "mla.core", "--report", str(report_path)]) == 0
    data = json.loads(report_path.read_text())
    core_cases = sum(definition["id"].startswith("mla.core") for definition in case_definitions())
    assert data["failed"] == 0 and data["passed"] == core_cases and data["cases"][0]["case_id"].startswith("mla.core")
    bad = tmp_path / "bad_adapter.py"
    bad.write_text("def moe_route(config, weights, hidden):\n    raise ValueError('nope')\n")
    assert main(["check", str(bad), "--select", "moe.route"]) == 1
    assert "adapter raised ValueError: nope" in capsys.readouterr().out
    assert main(["check", "ref", "--profile", "bf8"]) == 2


def test_every_profile_emulation_sits_at_its_recorded_noise_and_twice_the_allowance_fails():
    """The manifest's noise is the stored emulation's own error, which uses at most 1/k of the allowance; the same
    error direction at twice the allowance fails (an emulation passing with noise defined from itself proves only k >= 1)."""
    from mla_ref.conformance.compare import compare_tensor
    from mla_ref.golden.generate import default_golden_dir
    from mla_ref.golden.manifest import read_manifest
    from mla_ref.golden.storage import read_npz
    from mla_ref.conformance.protocol import entry_points
    from mla_ref.trace import storage_format
    from mla_ref.trace import profile as declared_profile
    directory = default_golden_dir()
    amplified = 0
    for case_id, entry in read_manifest(directory / "manifest.yaml")["cases"].items():
        tensors = read_npz(directory / entry["file"])
        steps = entry_points()[entry["entry_point"]]["output_steps"]
        for profile, recorded in entry["profiles"].items():
            for key, noise in recorded["noise"].items():
                if not key.startswith("output:") or tensors[key].dtype.kind != "f":
                    continue
                name, truth, emulated = key.split(":", 1)[1], tensors[key], tensors[f"emulated:{profile}:{key.split(':', 1)[1]}"]
                with np.errstate(invalid="ignore"):  # inf - inf at the truth's own non-finite positions
                    error = np.where(np.isfinite(truth), emulated - truth, 0.0)
                where = f"{case_id} {profile} {name}"
                source = declared_profile(profile).get("noise_from")
                if source is not None:  # TOLERANCE.2 noise_from (fp64): the larger of its own error and the source's, scaled
                    ratio = 2.0 ** -53 / 2.0 ** -24  # u_fp64 / u_fp32, spec/tolerance.yaml formats
                    assert source == {"profile": "fp32", "scale": "unit_roundoff_ratio"}, where
                    own = float(np.linalg.norm(error))
                    assert noise == pytest.approx(max(own, ratio * entry["profiles"]["fp32"]["noise"][key]), rel=1e-12, abs=1e-300), where
                    continue
                assert noise == pytest.approx(float(np.linalg.norm(error)), rel=1e-12, abs=1e-300), where
                assert recorded["noise_max"][key] == pytest.approx(float(np.abs(error).max(initial=0.0)), rel=1e-12, abs=1e-300), where
                rule = dict(name=name, truth=truth, noise_l2=noise, profile_name=profile, fmt=storage_format(profile, steps[name], name),
                            noise_max=recorded["noise_max"][key])
                verdict = compare_tensor(candidate=emulated, **rule)
                k = 6.0  # spec/tolerance.yaml acceptance.k
                assert verdict.passed and verdict.used <= (1 + 1e-9) / k, f"{where}: {verdict.reason or verdict.used}"
                if noise > 0:
                    factor = 2 * verdict.allowed_l2 / noise
                    wrong = compare_tensor(candidate=truth + factor * error, **rule)
                    assert not wrong.passed and wrong.used == pytest.approx(2, rel=1e-6), where
                    amplified += 1
    assert amplified > 200


def test_expert_order_within_the_top_k_does_not_matter():
    def route(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        return {"expert_ids": result["expert_ids"][:, ::-1], "weights": result["weights"][:, ::-1]}
    assert run(adapter(moe_route=route), "moe.route.v3/").cases[0].status == "pass"

    def wrong(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        return {"expert_ids": result["expert_ids"][:, ::-1], "weights": result["weights"]}  # weights not moved with the ids
    assert run(adapter(moe_route=wrong), "moe.route.v3/").cases[0].status == "fail"


def test_kept_groups_in_another_order_pass():
    """MOE.5 guarantees a margin between kept and dropped groups only: the kept set counts, not its order."""
    from mla_ref.config import from_dict
    from mla_ref.moe import route as reference_route

    def route(swap):
        def moe_route(config, weights, hidden):
            kept = reference_route(from_dict(config), weights, hidden).kept_groups
            return {**ref.moe_route(config, weights, hidden), "MOE.5/kept_groups": swap(kept)}
        return adapter(moe_route=moe_route)
    assert run(route(lambda kept: kept[:, ::-1]), "moe.route.v3/", "fp64").cases[0].status == "pass"
    other_set = run(route(lambda kept: np.where(kept == kept[:1, :1], (kept + 1) % 4, kept)), "moe.route.v3/", "fp64").cases[0]
    assert other_set.status == "fail" and other_set.first_divergent_step == "MOE.5", other_set.reason


def test_a_crash_reads_as_an_infinite_share_in_the_strict_json_report():
    crashed = adapter(latent_attention_core=lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    def no_constants(name):
        raise AssertionError(f"{name} is not strict JSON")
    data = json.loads(check(crashed, "bf16", "mla.core.paged/tiny/bs1-").to_json(), parse_constant=no_constants)
    assert data["failed"] == 1 and data["cases"][0]["used"] == "inf" and data["cases"][0]["status"] == "fail"


def test_cases_are_selected_by_step_and_level():
    from mla_ref.golden.generate import default_golden_dir
    from mla_ref.golden.manifest import read_manifest
    cases = read_manifest(default_golden_dir() / "manifest.yaml")["cases"]
    by_step = {case.case_id for case in check(ref, "fp32", step="MOE.5").cases}
    by_level = {case.case_id for case in check(ref, "fp32", level="kernel").cases}
    assert by_step == {case_id for case_id, entry in cases.items() if "MOE.5" in entry["steps"]} and by_step
    assert by_level == {case_id for case_id, entry in cases.items() if entry["level"] == "kernel"} and by_level


@pytest.mark.parametrize("change", ["outside the acceptable choices", "another shape"])
def test_a_near_tie_choice_that_is_not_acceptable_is_not_teacher_forced(change):
    def route(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        ids = (result["expert_ids"] + 1) % config["n_routed_experts"] if change == "outside the acceptable choices" else result["expert_ids"][:, :1]
        return {"expert_ids": ids, "weights": result["weights"]}
    case = run(adapter(moe_route=route), "moe.route.neartie/").cases[0]
    assert case.status == "fail" and any(c.name == "expert_ids" and not c.passed for c in case.comparisons), case.reason


def _declines_mscale_mismatch(config, weights, hidden, start_positions):
    """An adapter whose RoPE has no cos/sin amplitude: it declares the configs that need one unsupported."""
    from mla_ref import Unsupported
    if config["rope_scaling_type"] == "yarn" and config["mscale"] != config["mscale_all_dim"]:
        raise Unsupported(f"no cos/sin amplitude: mscale {config['mscale']} != mscale_all_dim {config['mscale_all_dim']}")
    return ref.mla_prefill(config, weights, hidden, start_positions)


def test_unsupported_is_its_own_status_never_a_pass():
    report = check(adapter(mla_prefill=_declines_mscale_mismatch), "fp32", "mla.prefill.yarn",
                   waivers={"*mscale*": "a waiver does not turn a declaration into a verdict"})
    statuses = {case.case_id: case.status for case in report.cases}
    declined = [case_id for case_id, status in statuses.items() if status == "unsupported"]
    assert sorted(declined) == ["mla.prefill.yarn/tiny-mscale-mismatch/seed0", "mla.prefill.yarn/tiny-yarn-no-mscale-all-dim/seed0"]
    assert statuses["mla.prefill.yarn/tiny-yarn/seed0"] == "pass" and report.ok
    assert report.count("pass") == 1 and report.counts()["unsupported"] == 2
    assert report.summary().startswith("1 passed, 0 failed, 0 skipped, 0 waived, 2 unsupported")
    case = next(case for case in report.cases if case.status == "unsupported")
    assert case.reason.startswith("no cos/sin amplitude: mscale") and case.reason in report.table()
    data = json.loads(report.to_json())
    assert data["unsupported"] == 2 and data["passed"] == 1
    assert {c["case_id"]: c["reason"] for c in data["cases"] if c["status"] == "unsupported"}[case.case_id] == case.reason


def test_a_crash_is_a_failure_not_unsupported():
    def crashes(config, weights, hidden, start_positions):
        raise RuntimeError("selected index k out of range")
    case = run(adapter(mla_prefill=crashes), "mla.prefill/tiny/").cases[0]
    assert case.status == "fail" and "RuntimeError" in case.reason


def test_pytest_plugin_skips_an_unsupported_case_with_its_reason(monkeypatch):
    from mla_ref.conformance import test_conformance
    monkeypatch.setattr(test_conformance, "ADAPTER_MODULE", adapter(mla_prefill=_declines_mscale_mismatch))
    monkeypatch.setattr(test_conformance, "PROFILE", "fp32")
    with pytest.raises(pytest.skip.Exception, match="unsupported: no cos/sin amplitude"):
        test_conformance.test_golden_case("mla.prefill.yarn/tiny-mscale-mismatch/seed0")


def test_extension_cases_are_tagged_in_the_manifest_and_counted_apart(tmp_path):
    from mla_ref.golden.cases import case_definitions
    from mla_ref.golden.generate import generate
    tagged = {d["id"]: d["extension"] for d in case_definitions() if d.get("extension")}
    assert "moe.layer.edge/tiny/one-expert-per-group-seed0" in tagged and len(tagged) >= 3
    entries = generate(tmp_path, "mla.prefill.yarn/tiny-")
    assert {case_id: entry.get("extension") for case_id, entry in entries.items()} == {
        "mla.prefill.yarn/tiny-yarn/seed0": None,
        "mla.prefill.yarn/tiny-mscale-mismatch/seed0": tagged["mla.prefill.yarn/tiny-mscale-mismatch/seed0"],
        "mla.prefill.yarn/tiny-yarn-no-mscale-all-dim/seed0": tagged["mla.prefill.yarn/tiny-yarn-no-mscale-all-dim/seed0"]}
    report = check(adapter(mla_prefill=_declines_mscale_mismatch), "fp32", directory=tmp_path)
    assert "(released-model configs: 1 passed, 0 failed, 0 unsupported; extensions: 0 passed, 0 failed, 2 unsupported)" in report.summary()
    assert sum("[extension]" in line for line in report.table().splitlines()) == 2
    data = json.loads(report.to_json())
    assert data["released_model_configs"]["passed"] == 1 and data["extensions"]["unsupported"] == 2
    assert all(bool(c["extension"]) == (c["status"] == "unsupported") for c in data["cases"])
