"""Check your own inputs (GOLDEN.own_inputs): a golden case's verdict on a user's config, weights, inputs and outputs."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from mla_ref import ShapeError, WeightError, load_preset
from mla_ref.cli import main
from mla_ref.conformance import check_outputs, reference_adapter as ref
from mla_ref.conformance.check import check, load_case
from mla_ref.conformance.own_inputs import parse_arguments, read_tensors
from mla_ref.errors import InputError
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest
from mla_ref.golden.storage import write_safetensors
from mla_ref.weights import generate_attention_weights

CASE = "mla.prefill.yarn/tiny-mscale-mismatch/seed0"


def golden_case(case_id: str) -> tuple[dict, dict]:
    entry = read_manifest(default_golden_dir() / "manifest.yaml")["cases"][case_id]
    return entry, load_case(default_golden_dir(), entry)


def own_layer(seed: int = 3) -> tuple[object, dict, dict]:
    config = load_preset("tiny-yarn")
    rng = np.random.default_rng(seed)
    inputs = {"hidden": rng.standard_normal((2, 6, config.hidden_size)), "start_positions": np.array([0, 5000])}
    return config, generate_attention_weights(config, seed=seed), inputs


@pytest.mark.parametrize("profile", ["fp64", "fp32", "bf16", "fp16"])
def test_the_reference_passes_and_a_scaled_output_fails(profile):
    config, weights, inputs = own_layer()
    truth = ref.mla_prefill(config.to_dict(), weights, **inputs)
    assert check_outputs("mla_prefill", config, weights, inputs, truth, profile).ok
    scaled = dict(truth, output=truth["output"] * 1.1)  # 10%: far above every profile's rounding (2^-8 at most)
    case = check_outputs("mla_prefill", config, weights, inputs, scaled, profile).cases[0]
    assert case.status == "fail" and case.first_divergent_step == "MLA.12" and "constant factor" in " ".join(case.diagnosis)


@pytest.mark.parametrize("profile", ["fp32", "bf16"])
def test_the_verdict_on_a_golden_cases_data_is_the_golden_cases_verdict(profile):
    """Built from the case's stored inputs, the own-inputs run judges a candidate exactly as `check` does (same used share)."""
    entry, stored = golden_case(CASE)

    def prefill(config, weights, hidden, start_positions):  # YaRN mscale^2 applied once: a bug both must judge alike
        result = ref.mla_prefill(dict(config, mscale_all_dim=config["mscale_all_dim"] ** 0.5), weights, hidden, start_positions)
        return result
    golden = check(types.SimpleNamespace(mla_prefill=prefill), profile, CASE).cases[0]
    produced = prefill(entry["config"], stored["weight"], **stored["input"])
    own = check_outputs("mla_prefill", entry["config"], stored["weight"], stored["input"], produced, profile).cases[0]
    assert own.status == golden.status
    assert own.used == pytest.approx(golden.used, rel=1e-9)
    assert own.first_divergent_step == golden.first_divergent_step and own.diagnosis == golden.diagnosis


def test_discrete_outputs_are_judged_with_margins():
    entry, stored = golden_case("moe.route.v3/tiny/seed0")
    truth = ref.moe_route(entry["config"], stored["weight"], stored["input"]["hidden"])
    assert check_outputs("moe_route", entry["config"], stored["weight"], stored["input"], truth, "bf16").ok
    swapped = dict(truth, expert_ids=truth["expert_ids"][::-1].copy())
    report = check_outputs("moe_route", entry["config"], stored["weight"], stored["input"], swapped, "bf16")
    assert not report.ok and "expert_ids" in report.cases[0].reason


def test_scalar_arguments_come_through_args():
    entry, stored = golden_case("mla.core.paged/tiny/bs16-seed0")
    truth = ref.latent_attention_core(**stored["input"], **entry["args"])
    assert check_outputs("latent_attention_core", entry["config"], {}, stored["input"], truth, "fp32", args=entry["args"]).ok
    halved = dict(entry["args"], softmax_scale=entry["args"]["softmax_scale"] / 2)
    assert not check_outputs("latent_attention_core", entry["config"], {}, stored["input"], truth, "fp32", args=halved).ok


def test_bad_input_is_a_typed_error_naming_the_tensor():
    config, weights, inputs = own_layer()
    truth = ref.mla_prefill(config.to_dict(), weights, **inputs)
    with pytest.raises(ShapeError, match=r"hidden: expected \[batch, seq, 64\]"):
        check_outputs("mla_prefill", config, weights, dict(inputs, hidden=inputs["hidden"][..., 1:]), truth, "fp32")
    with pytest.raises(InputError, match="start_positions: missing input of mla_prefill"):
        check_outputs("mla_prefill", config, weights, {"hidden": inputs["hidden"]}, truth, "fp32")
    with pytest.raises(WeightError, match=r"kv_b_proj.weight: missing \(expected shape"):
        check_outputs("mla_prefill", config, {k: v for k, v in weights.items() if k != "kv_b_proj.weight"}, inputs, truth, "fp32")
    with pytest.raises(InputError, match="unknown entry point 'mla_prefil'"):
        check_outputs("mla_prefil", config, weights, inputs, truth, "fp32")
    with pytest.raises(InputError, match="unknown profile"):
        check_outputs("mla_prefill", config, weights, inputs, truth, "bf17")
    wrong_shape = dict(truth, output=truth["output"][:, :-1])
    case = check_outputs("mla_prefill", config, weights, inputs, wrong_shape, "fp32").cases[0]
    assert case.status == "fail" and "shape" in case.reason


def test_an_input_that_is_no_parameter_or_no_numeric_array_is_named():
    config, weights, inputs = own_layer()
    with pytest.raises(InputError, match=r"^bias: is no parameter of mla_prefill; expected \['hidden', 'start_positions'\] .*"
                                         r"\(GOLDEN.own_inputs\)$"):
        check_outputs("mla_prefill", config, weights, dict(inputs, bias=np.zeros(3)), {}, "fp32")
    with pytest.raises(InputError, match=r"^hidden: expected a numeric array, got dtype <U\d+ .*\(GOLDEN.own_inputs\)$"):
        check_outputs("mla_prefill", config, weights, dict(inputs, hidden=np.array(["a", "b"])), {}, "fp32")


def test_tensor_files_are_npz_or_safetensors_and_an_unreadable_one_names_its_option(tmp_path):
    np.savez(tmp_path / "in.npz", hidden=np.ones((1, 2)))
    np.testing.assert_array_equal(read_tensors(tmp_path / "in.npz", "--inputs")["hidden"], np.ones((1, 2)))
    (tmp_path / "in.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"^--inputs: expected an .npz or .safetensors file, got .*in\.pt \(GOLDEN.own_inputs\)$"):
        read_tensors(tmp_path / "in.pt", "--inputs")
    with pytest.raises(InputError, match=r"^--weights: no such file: .*absent\.safetensors \(GOLDEN.own_inputs\)$"):
        read_tensors(tmp_path / "absent.safetensors", "--weights")
    (tmp_path / "torn.npz").write_bytes((tmp_path / "in.npz").read_bytes()[:40])  # a truncated download
    with pytest.raises(InputError, match=r"^--outputs: not a readable .npz file: .*\(GOLDEN.own_inputs\)$"):
        read_tensors(tmp_path / "torn.npz", "--outputs")
    np.savez(tmp_path / "pickled.npz", hidden=np.array([None, 1], dtype=object))  # loading never unpickles
    with pytest.raises(InputError, match=r"^--inputs: .*object.*\(GOLDEN.own_inputs\)$"):
        read_tensors(tmp_path / "pickled.npz", "--inputs")


def test_scalar_arguments_are_yaml_numbers_or_booleans():
    assert parse_arguments(["steps=4", "causal=true", "softmax_scale=0.125", "layer=-1"]) == {
        "steps": 4, "causal": True, "softmax_scale": 0.125, "layer": -1}
    for pair in ["steps", "=4"]:
        with pytest.raises(InputError, match=rf"^--arg: expected NAME=VALUE, got '{pair}' \(GOLDEN.own_inputs\)$"):
            parse_arguments([pair])
    for text in ["four", "[1, 2]", ""]:
        with pytest.raises(InputError, match=r"^--arg steps: expected a number or true / false, got .* \(GOLDEN.own_inputs\)$"):
            parse_arguments([f"steps={text}"])


def test_cli_reads_npz_and_safetensors_and_exits_by_verdict(tmp_path, capsys):
    config, weights, inputs = own_layer()
    truth = ref.mla_prefill(config.to_dict(), weights, **inputs)
    write_safetensors(tmp_path / "w.safetensors", weights)
    np.savez(tmp_path / "in.npz", **inputs)
    np.savez(tmp_path / "good.npz", **truth)
    np.savez(tmp_path / "bad.npz", output=truth["output"] * 1.01, lse=truth["lse"])
    (tmp_path / "cfg.json").write_text(json.dumps(config.to_dict()))
    common = ["check-outputs", "--entry-point", "mla_prefill", "--config", str(tmp_path / "cfg.json"), "--weights",
              str(tmp_path / "w.safetensors"), "--inputs", str(tmp_path / "in.npz"), "--profile", "fp32"]
    assert main([*common, "--outputs", str(tmp_path / "good.npz"), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["passed"] == 1
    assert main([*common, "--outputs", str(tmp_path / "bad.npz")]) == 1
    assert "constant factor" in capsys.readouterr().out
    assert main([*common, "--outputs", str(tmp_path / "missing.npz")]) == 2
    assert "--outputs: no such file" in capsys.readouterr().err
    assert main([*common, "--outputs", str(tmp_path / "good.npz"), "--arg", "steps"]) == 2


# ---------------------------------------------------------------- golden cases for your own config (GOLDEN.own_config)

def test_golden_generate_for_your_own_config_verifies_and_checks(tmp_path, capsys):
    from mla_ref.golden.generate import verify
    config = load_preset("tiny-kimi-k2").replace(name="My Kimi")
    (tmp_path / "cfg.json").write_text(json.dumps(config.to_dict()))
    folder = tmp_path / "mine"
    assert main(["golden", "generate", "--config", str(tmp_path / "cfg.json"), "--dir", str(folder), "--select", "mla.prefill*"]) == 0
    manifest = read_manifest(folder / "manifest.yaml")
    assert manifest["own_config"]["name"] == "my-kimi" and manifest["own_config"]["config"]["rope_theta"] == 50000.0
    assert sorted(manifest["cases"]) == ["mla.prefill.half/my-kimi/seed0", "mla.prefill/my-kimi/seed0"]
    assert all(entry["config"]["rope_theta"] == 50000.0 for entry in manifest["cases"].values())
    assert all(row.status == "ok" for row in verify(folder))
    assert check(ref, "bf16", directory=folder).ok
    wrong_theta = types.SimpleNamespace(mla_prefill=lambda config, weights, hidden, start_positions:
                                        ref.mla_prefill(dict(config, rope_theta=10000.0), weights, hidden, start_positions))
    assert not check(wrong_theta, "fp32", directory=folder).ok


def test_your_own_config_folder_is_tamper_evident_and_never_overwritten(tmp_path, capsys):
    import yaml
    from mla_ref.errors import GoldenError
    folder = tmp_path / "mine"
    assert main(["golden", "generate", "--config", "tiny-kimi-k2", "--dir", str(folder), "--select", "mla.prefill/*"]) == 0
    assert main(["golden", "generate", "--config", "tiny-yarn", "--dir", str(folder), "--select", "mla.prefill/*"]) == 3
    assert "built for another config (tiny-kimi-k2)" in capsys.readouterr().err
    assert main(["golden", "generate", "--config", "tiny-kimi-k2", "--select", "mla.prefill/*"]) == 2  # --dir required
    document = yaml.safe_load((folder / "manifest.yaml").read_text())
    document["own_config"]["config"]["rope_theta"] = 10000.0  # the folder now claims another config than its cases hold
    (folder / "manifest.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(GoldenError, match="rope_theta"):
        check(ref, "fp32", directory=folder)


def test_cases_a_config_cannot_hold_are_skipped_with_the_reason(tmp_path, capsys):
    folder = tmp_path / "mine"
    assert main(["golden", "generate", "--config", "tiny-kimi-k2", "--dir", str(folder), "--select", "mtp.forward/*"]) == 0
    assert "skipped mtp.forward/tiny-kimi-k2-dense/seed0: ConfigError" in capsys.readouterr().out  # Kimi-K2 has no MTP module
    skipped = read_manifest(folder / "manifest.yaml")["own_config"]["skipped"]
    assert list(skipped) == ["mtp.forward/tiny-kimi-k2-dense/seed0"] and "num_nextn_predict_layers" in skipped["mtp.forward/tiny-kimi-k2-dense/seed0"]
