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
    case = run(adapter(mla_prefill=prefill), "mla.prefill/tiny/seed0").cases[0]
    assert case.status == "fail" and case.first_divergent_step == "MLA.4"
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
    assert data["failed"] == 0 and data["passed"] == 6 and data["cases"][0]["case_id"].startswith("mla.core")
    bad = tmp_path / "bad_adapter.py"
    bad.write_text("def moe_route(config, weights, hidden):\n    raise ValueError('nope')\n")
    assert main(["check", str(bad), "--select", "moe.route"]) == 1
    assert "adapter raised ValueError: nope" in capsys.readouterr().out
    assert main(["check", "ref", "--profile", "bf8"]) == 2


def test_every_profile_emulation_passes_its_own_rule():
    """The reference's own emulation of a profile is a correct implementation of it: it must pass (Triton adapter finding)."""
    from mla_ref.conformance.compare import compare_tensor
    from mla_ref.golden.generate import default_golden_dir
    from mla_ref.golden.manifest import read_manifest
    from mla_ref.golden.storage import read_npz
    from mla_ref.conformance.protocol import entry_points
    from mla_ref.trace import storage_format
    directory = default_golden_dir()
    for case_id, entry in read_manifest(directory / "manifest.yaml")["cases"].items():
        tensors = read_npz(directory / entry["file"])
        steps = entry_points()[entry["entry_point"]]["output_steps"]
        for profile, recorded in entry["profiles"].items():
            for key, noise in recorded["noise"].items():
                if not key.startswith("output:"):
                    continue
                name = key.split(":", 1)[1]
                verdict = compare_tensor(name, tensors[f"emulated:{profile}:{name}"], tensors[key], noise, profile,
                                         fmt=storage_format(profile, steps[name], name), noise_max=recorded["noise_max"][key])
                assert verdict.passed, f"{case_id} {profile} {name}: {verdict.reason}"


def test_expert_order_within_the_top_k_does_not_matter():
    def route(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        return {"expert_ids": result["expert_ids"][:, ::-1], "weights": result["weights"][:, ::-1]}
    assert run(adapter(moe_route=route), "moe.route.v3/").cases[0].status == "pass"

    def wrong(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        return {"expert_ids": result["expert_ids"][:, ::-1], "weights": result["weights"]}  # weights not moved with the ids
    assert run(adapter(moe_route=wrong), "moe.route.v3/").cases[0].status == "fail"
