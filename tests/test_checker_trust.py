"""Verdicts a kernel author can trust (issue 13): never green on nothing, tamper-evident golden, a checker that survives
any adapter, and reports that read right. Each test is a scenario measured on 7fb0a02, where the old checker was green,
aborted, or wrote something wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from mla_ref.cli import main
from mla_ref.conformance import reference_adapter as ref
from mla_ref.conformance.check import CaseResult, Report, check, format_used
from mla_ref.conformance.compare import Comparison
from mla_ref.errors import GoldenError, InputError
from mla_ref.golden.cases import case_definitions, file_name
from mla_ref.golden.generate import default_golden_dir, verify
from mla_ref.golden.storage import read_npz
from mla_ref.spec import read_yaml, spec_dir

from conftest import edit_manifest

KERNEL_CASE = "mla.core.paged/tiny/bs16-seed0"
CORE_CASES = sum(definition["id"].startswith("mla.core") for definition in case_definitions())  # the kernel cases of golden/


def adapter(**functions) -> types.SimpleNamespace:
    return types.SimpleNamespace(**functions)


def scaled_core(factor: float):
    """A kernel whose output is ``factor`` x the truth (a wrong softmax-V scale), its LSE right."""
    def core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
        result = ref.latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return {"out": result["out"] * factor, "lse": result["lse"]}
    return core


# ---------------------------------------------------------------- never green on nothing

@pytest.mark.parametrize("options, message", [
    (["--select", "nothing-matches"], "'nothing-matches' matches no golden case"),
    (["--step", "MLA.99"], "unknown step id 'MLA.99'"),
    (["--select", "mla.core", "--level", "model"], "no selected golden case is at level 'model'"),
    (["--select", "moe.route", "--step", "MLA.9"], "no selected golden case covers MLA.9"),
])
def test_a_selection_that_matches_nothing_is_an_error(options, message, capsys):
    assert main(["check", "mla_ref.conformance.reference_adapter", *options]) == 2
    assert message in capsys.readouterr().err


def test_an_adapter_without_any_entry_point_is_refused_with_the_nearest_names(tmp_path, capsys):
    misspelled = tmp_path / "misspelled_adapter.py"
    misspelled.write_text("def mla_prefil(config, weights, hidden, start_positions):\n    return {}\n\n"
                          "def moe_rout(config, weights, hidden):\n    return {}\n")
    assert main(["check", str(misspelled)]) == 2
    error = capsys.readouterr().err
    assert "defines none of the entry points" in error and "mla_prefil -> mla_prefill" in error and "moe_rout -> moe_route" in error
    assert main(["check", "json"]) == 2, "a module without entry points checks nothing"


def test_a_selection_the_adapter_cannot_run_is_an_error():
    with pytest.raises(InputError, match=rf"none of the {CORE_CASES} selected cases can run: they need \['latent_attention_core'\]"):
        check(adapter(moe_route=ref.moe_route), "fp32", "mla.core")


def test_a_misspelled_entry_point_beside_real_ones_is_named_in_its_skips():
    report = check(adapter(moe_route=ref.moe_route, moe_layr=ref.moe_layer), "fp32", "moe.")
    skipped = [case for case in report.cases if case.entry_point == "moe_layer"]
    assert skipped and all("it defines 'moe_layr': misspelled?" in case.reason for case in skipped)


def test_golden_verify_of_nothing_is_an_error(capsys):
    assert main(["golden", "verify", "--select", "nothing"]) == 2
    assert "'nothing' matches no case" in capsys.readouterr().err


def test_a_missing_golden_folder_is_an_error(tmp_path, capsys):
    assert main(["check", "mla_ref.conformance.reference_adapter", "--dir", str(tmp_path / "absent")]) == 3  # GoldenError: README exit status 3
    assert "manifest is missing" in capsys.readouterr().err


@pytest.mark.parametrize("waivers, message", [
    ({"*": "everything fails, known"}, "matches every one of the"),
    ({"mla.*": "typo in the glob", "*/*": "all"}, "matches every one of the"),
    ({"mla.core.paged/tiny/bs16-seed1": "stale"}, "matches no golden case"),
    ({KERNEL_CASE: ""}, "expected a case-id glob mapped to a reason"),
])
def test_a_waiver_must_name_specific_cases(waivers, message):
    failing = adapter(latent_attention_core=scaled_core(1.5))
    with pytest.raises(InputError, match=message):
        check(failing, "fp32", "mla.core", waivers=waivers)


def test_an_adapter_that_exits_fails_its_cases_and_the_run_goes_on(tmp_path, capsys):
    exiting = tmp_path / "exiting_adapter.py"
    exiting.write_text("import sys\n\ndef moe_route(config, weights, hidden):\n    sys.exit(0)\n")
    assert main(["check", str(exiting), "--select", "moe.route"]) == 1
    out = capsys.readouterr().out
    routing_cases = sum("moe.route" in case_id for case_id in read_yaml(default_golden_dir() / "manifest.yaml")["cases"])
    assert routing_cases >= 5 and out.count("adapter called sys.exit(0)") == routing_cases
    assert f"0 passed, {routing_cases} failed" in out


def _run_plugin(tmp_path: Path, collect: bool = False, **environment: str) -> subprocess.CompletedProcess:
    """``pytest --pyargs mla_ref.conformance`` in a fresh process, with only the given MLA_REF_* variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLA_REF_")}
    env.update(environment)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "mla_ref.conformance"]
    return subprocess.run(command + (["--collect-only"] if collect else []), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # pytest or adapters in child processes
def test_the_pytest_plugin_fails_where_nothing_would_be_checked(tmp_path):
    empty = _run_plugin(tmp_path, MLA_REF_ADAPTER="mla_ref.conformance.reference_adapter", MLA_REF_GOLDEN_DIR=str(tmp_path / "none"))
    assert empty.returncode == 1 and "nothing to check" in empty.stdout and "manifest is missing" in empty.stdout
    no_entry = _run_plugin(tmp_path, MLA_REF_ADAPTER="json")
    assert no_entry.returncode == 1 and "defines none of the entry points" in no_entry.stdout
    no_adapter = _run_plugin(tmp_path)
    assert no_adapter.returncode == 1 and "set MLA_REF_ADAPTER" in no_adapter.stdout


@pytest.mark.slow  # pytest or adapters in child processes
def test_the_pytest_plugin_selects_with_the_cli_pattern_syntax(tmp_path):
    selected = check(ref, "fp32", "moe.route*").cases
    collected = _run_plugin(tmp_path, MLA_REF_ADAPTER="mla_ref.conformance.reference_adapter", MLA_REF_SELECT="moe.route*", collect=True)
    names = [line for line in collected.stdout.splitlines() if "test_golden_case[" in line]
    assert collected.returncode == 0 and len(names) == len(selected) >= 5, collected.stdout


# ---------------------------------------------------------------- tamper-evident golden

def test_a_wrong_kernel_fails_on_the_real_golden():
    """The baseline of the tamper scenarios: x1.5 on the kernel output is a failure."""
    report = check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", "mla.core")
    assert not report.ok and report.count("fail") == CORE_CASES


def test_a_truth_edited_to_match_the_adapter_is_tampered_golden_not_a_pass(golden_copy):
    path = golden_copy / file_name(KERNEL_CASE)
    tensors = read_npz(path)
    tensors["output:out"] = tensors["output:out"] * 1.5
    np.savez(path, **tensors)
    with pytest.raises(GoldenError, match=r"mla.core.paged__tiny__bs16-seed0.npz: output:out: tampered golden: sha256 differs"):
        check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", KERNEL_CASE, directory=golden_copy)


def test_a_half_rewritten_folder_is_refused(golden_copy):
    """An interrupted generate: a case file from another build beside the old manifest."""
    shutil.copy(golden_copy / file_name("mla.core.paged/tiny/bs1-seed0"), golden_copy / file_name(KERNEL_CASE))
    with pytest.raises(GoldenError, match="tampered golden"):
        check(ref, "fp32", "mla.core", directory=golden_copy)


def test_deleted_cases_are_refused(golden_copy):
    def drop_kernel_cases(manifest):
        for case_id in [case_id for case_id in manifest["cases"] if case_id.startswith("mla.core")]:
            del manifest["cases"][case_id]
            (golden_copy / file_name(case_id)).unlink()
    edit_manifest(golden_copy, drop_kernel_cases)
    with pytest.raises(GoldenError, match=r"mla.core.paged/tiny/bs16-seed0: defined in spec/golden.yaml, missing from the manifest"):
        check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", directory=golden_copy)


def test_inflated_noise_is_refused(golden_copy):
    def inflate(manifest):
        noise = manifest["cases"][KERNEL_CASE]["profiles"]["fp32"]["noise"]
        noise["output:out"] *= 1e6
    edit_manifest(golden_copy, inflate)
    with pytest.raises(GoldenError, match=r"profiles.fp32.noise.output:out: tampered golden: manifest .*, the stored emulation gives"):
        check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", KERNEL_CASE, directory=golden_copy)


def test_a_removed_profile_is_refused(golden_copy):
    edit_manifest(golden_copy, lambda manifest: manifest["cases"][KERNEL_CASE]["profiles"].pop("fp32"))
    with pytest.raises(GoldenError, match=rf"{KERNEL_CASE}: profiles: manifest \['bf16', 'fp16', 'fp64', 'tf32'\]"):
        check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", KERNEL_CASE, directory=golden_copy)


@pytest.mark.parametrize("field, change, named", [
    ("args", lambda entry: entry["args"].update(softmax_scale=entry["args"]["softmax_scale"] / 2), "args.softmax_scale: manifest"),
    ("entry_point", lambda entry: entry.update(entry_point="mla_prefill"), "entry_point: manifest 'mla_prefill', spec 'latent_attention_core'"),
    ("config", lambda entry: entry["config"].update(rope_theta=50000.0), "config.rope_theta: manifest 50000.0, spec 10000.0"),
])
def test_a_changed_definition_field_is_refused_by_check_and_verify(golden_copy, field, change, named):
    edit_manifest(golden_copy, lambda manifest: change(manifest["cases"][KERNEL_CASE]))
    with pytest.raises(GoldenError, match=named.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        check(ref, "fp32", KERNEL_CASE, directory=golden_copy)
    row = next(row for row in verify(golden_copy, KERNEL_CASE) if row.case_id == KERNEL_CASE)
    assert row.status == "FAIL" and named in row.detail


def test_a_stale_spec_version_is_refused(golden_copy):
    edit_manifest(golden_copy, lambda manifest: manifest.update(spec_version="0.0.1"))
    with pytest.raises(GoldenError, match=r"spec_version '0.0.1', the spec is"):
        check(ref, "fp32", KERNEL_CASE, directory=golden_copy)


@pytest.mark.slow  # pytest or adapters in child processes
def test_the_pytest_plugin_refuses_tampered_golden(tmp_path, golden_copy):
    edit_manifest(golden_copy, lambda manifest: manifest["cases"][KERNEL_CASE]["args"].update(causal=True))
    run = _run_plugin(tmp_path, MLA_REF_ADAPTER="mla_ref.conformance.reference_adapter", MLA_REF_GOLDEN_DIR=str(golden_copy),
                      MLA_REF_SELECT="mla.core")
    assert run.returncode == 1 and "args.causal: manifest True, spec False" in run.stdout and " passed" not in run.stdout


# ---------------------------------------------------------------- survive any adapter

class ArrayLike:
    """An object NumPy converts through ``__array__`` (JAX arrays, cupy on host, xarray)."""

    def __init__(self, value):
        self.value = value

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.value, dtype=dtype)


class DeviceTensor:
    """An object with ``.cpu()`` and ``.numpy()`` only (a device tensor's shape of API)."""

    def __init__(self, value):
        self.value = value

    def cpu(self):
        return self

    def numpy(self):
        return np.asarray(self.value)


@pytest.mark.parametrize("wrap", [ArrayLike, DeviceTensor, lambda value: value.tolist()], ids=["__array__", "cpu-numpy", "nested-list"])
def test_array_likes_are_converted(wrap):
    def core(*args):
        return {name: wrap(value) for name, value in ref.latent_attention_core(*args).items()}
    report = check(adapter(latent_attention_core=core), "fp64", "mla.core")
    assert report.ok and report.count("pass") == CORE_CASES, report.table()


def test_a_ragged_list_fails_its_case_with_a_clear_reason():
    def core(*args):
        result = ref.latent_attention_core(*args)
        return {"out": [[1.0, 2.0], [3.0]], "lse": result["lse"]}
    case = check(adapter(latent_attention_core=core), "fp32", KERNEL_CASE).cases[0]
    assert case.status == "fail" and "out: cannot convert to an array" in case.reason and "ragged" in case.reason


def test_integral_float_expert_ids_are_compared_as_integers():
    def route(config, weights, hidden):
        result = ref.moe_route(config, weights, hidden)
        return {"expert_ids": result["expert_ids"].astype(np.float64), "weights": result["weights"]}
    report = check(adapter(moe_route=route), "fp32", "moe.route")
    assert report.ok and report.count("pass") == len(report.cases) >= 5, report.table()


def test_a_checker_error_on_an_output_fails_that_case_only(monkeypatch):
    from mla_ref.conformance import check as check_module
    calls = []

    def broken_diagnose(*args):
        calls.append(1)
        raise TypeError("Got unsupported ScalarType BFloat16")
    monkeypatch.setattr(check_module, "diagnose", broken_diagnose)
    report = check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", "mla.core")
    assert len(report.cases) == CORE_CASES and report.count("fail") == CORE_CASES and calls
    assert "the checker could not judge the adapter's output: TypeError" in report.cases[0].reason


def test_the_adapter_exception_is_printed_once(tmp_path, capsys):
    bad = tmp_path / "raising_adapter.py"
    bad.write_text("def moe_route(config, weights, hidden):\n    raise ValueError('nope')\n")
    assert main(["check", str(bad), "--select", "moe.route.v3/tiny"]) == 1
    out = capsys.readouterr().out
    assert out.count("nope") == 1 and "adapter raised ValueError: nope (at raising_adapter.py:2 in moe_route)" in out


HOSTILE = textwrap.dedent("""
    import os
    import signal
    import sys
    import time

    from mla_ref.conformance import reference_adapter

    def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
        if int(cache_seqlens[0]) == 0:  # mla.core.paged/tiny/bs1-seed0
            time.sleep(600)
        if int(cache_seqlens[0]) == 9:  # mla.core.verify/tiny/sq2-seed0
            print("kernel: illegal memory access", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        if int(cache_seqlens[0]) == 17:  # mla.core.paged/tiny/bs16-seed0
            os._exit(3)
        return reference_adapter.latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
""")


@pytest.mark.slow  # pytest or adapters in child processes
def test_isolation_turns_a_hang_a_crash_and_an_exit_into_failed_cases(tmp_path, capsys):
    hostile = tmp_path / "hostile_adapter.py"
    hostile.write_text(HOSTILE)
    report_path = tmp_path / "report.json"
    status = main(["check", str(hostile), "--select", "mla.core.[pv]*", "--isolate", "--timeout", "10", "--report", str(report_path)])
    assert status == 1
    cases = {case["case_id"]: case for case in json.loads(report_path.read_text())["cases"]}
    assert "adapter timed out after 10 s" in cases["mla.core.paged/tiny/bs1-seed0"]["reason"]
    crashed = cases["mla.core.verify/tiny/sq2-seed0"]["reason"]
    assert "killed by signal SIGSEGV" in crashed and "kernel: illegal memory access" in crashed
    assert "exited with status 3 without returning outputs" in cases["mla.core.paged/tiny/bs16-seed0"]["reason"]
    assert [cases[case_id]["status"] for case_id in ("mla.core.paged/tiny-yarn/bs64-seed0", "mla.core.verify/tiny/sq4-seed0")] == ["pass"] * 2


def test_isolated_outputs_are_judged_as_in_process_ones(tmp_path):
    """The reference through a child process passes, and a wrong kernel fails the same way, with the same share used."""
    assert check("mla_ref.conformance.reference_adapter", "bf16", KERNEL_CASE, isolate=True).ok
    wrong = tmp_path / "wrong_adapter.py"
    wrong.write_text("from mla_ref.conformance import reference_adapter\n\ndef latent_attention_core(*args):\n"
                     "    result = reference_adapter.latent_attention_core(*args)\n    return {'out': result['out'] * 1.5, 'lse': result['lse']}\n")
    isolated = check(str(wrong), "fp32", KERNEL_CASE, isolate=True).cases[0]
    in_process = check(adapter(latent_attention_core=scaled_core(1.5)), "fp32", KERNEL_CASE).cases[0]
    assert isolated.status == in_process.status == "fail" and isolated.used == pytest.approx(in_process.used, rel=1e-12)


def test_isolation_needs_an_adapter_by_name():
    with pytest.raises(InputError, match="--isolate needs an adapter given by module name or path"):
        check(adapter(latent_attention_core=scaled_core(1.0)), "fp32", KERNEL_CASE, isolate=True)


@pytest.mark.parametrize("report", ["missing-folder/report.json", "."], ids=["missing-folder", "a-folder"])
def test_an_unwritable_report_path_is_refused_before_the_run(tmp_path, capsys, report):
    marker = tmp_path / "called"
    counting = tmp_path / "counting_adapter.py"
    counting.write_text(f"def moe_route(config, weights, hidden):\n    open({str(marker)!r}, 'a').close()\n    return {{}}\n")
    assert main(["check", str(counting), "--select", "moe.route", "--report", str(tmp_path / report)]) == 2
    assert not marker.exists(), "the adapter ran before the report path was checked"
    assert "(GOLDEN.report)" in capsys.readouterr().err


# ---------------------------------------------------------------- reports

def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _schema(name: str) -> dict:
    return json.loads((spec_dir() / "schemas" / name).read_text())


def test_the_report_is_strict_json_and_follows_its_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    mixed = adapter(latent_attention_core=lambda *args: {**ref.latent_attention_core(*args), "lse": np.zeros(1)})
    report = check(mixed, "fp32", "mla.core")
    assert all(case.used == float("inf") for case in report.cases), "a shape mismatch is an exact failure"
    data = _strict_json(report.to_json())
    assert data["schema"] == "mla-ref-check-report/1" and data["cases"][0]["used"] == "inf"
    jsonschema.Draft202012Validator(_schema("check-report.schema.json")).validate(data)
    passing = _strict_json(check(ref, "bf16", "mla.core").to_json())
    jsonschema.Draft202012Validator(_schema("check-report.schema.json")).validate(passing)
    assert all(isinstance(case["used"], float) for case in passing["cases"])


def test_the_golden_manifest_follows_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(_schema("golden-manifest.schema.json"))
    manifest = read_yaml(default_golden_dir() / "manifest.yaml")
    validator.validate(manifest)
    manifest["cases"][KERNEL_CASE]["tensors"]["output:out"]["sha256"] = "not-a-digest"
    assert not validator.is_valid(manifest)


def test_both_schemas_are_valid_json_schemas():
    jsonschema = pytest.importorskip("jsonschema")
    for name in ("check-report.schema.json", "golden-manifest.schema.json"):
        jsonschema.Draft202012Validator.check_schema(_schema(name))


@pytest.mark.parametrize("used, shown", [(0.372, "37.2%"), (9.5, "950.0%"), (94.63, "x94.6"), (480035078738485.6 / 100, "x4.8e12")])
def test_large_failures_read_as_multiples(used, shown):
    assert format_used(used) == shown


def test_the_table_shows_a_large_failure_as_a_multiple():
    table = check(adapter(latent_attention_core=scaled_core(1e6)), "fp32", KERNEL_CASE).table()
    row = next(line for line in table.splitlines() if line.startswith(KERNEL_CASE))
    assert " x" in row and "%" not in row.split()[2]


def test_a_failing_intermediate_beside_passing_outputs_is_stated_as_such():
    def prefill(config, weights, hidden, start_positions):
        from mla_ref import Trace
        trace = Trace()
        result = ref.mla_prefill(config, weights, hidden, start_positions, trace=trace)
        return {**result, "MLA.9/logits": trace["MLA.9"]["logits"] * 2}
    case = check(adapter(mla_prefill=prefill), "fp32", "mla.prefill/tiny/seed0").cases[0]
    assert case.status == "fail" and case.reason.startswith("required outputs pass, intermediate MLA.9/logits fails: MLA.9/logits: L2")


def test_unknown_intermediate_names_are_warnings():
    def prefill(config, weights, hidden, start_positions):
        from mla_ref import Trace
        trace = Trace()
        result = ref.mla_prefill(config, weights, hidden, start_positions, trace=trace)
        return {**result, "MLA.9/logit": trace["MLA.9"]["logits"], "attn_out": result["output"]}
    report = check(adapter(mla_prefill=prefill), "fp32", "mla.prefill/tiny/seed0")
    warnings = report.cases[0].warnings
    assert report.ok and len(warnings) == 2
    assert "returned 'MLA.9/logit'" in warnings[0] and "did you mean 'MLA.9/logits'" in warnings[0]
    assert "warning: returned 'attn_out'" in report.table()
    assert _strict_json(report.to_json())["cases"][0]["warnings"] == warnings


def test_a_float16_output_under_fp32_gets_a_dtype_hint():
    def core(*args):
        result = ref.latent_attention_core(*args)
        return {"out": result["out"].astype(np.float16), "lse": result["lse"]}
    case = check(adapter(latent_attention_core=core), "fp32", KERNEL_CASE).cases[0]
    assert case.status == "fail"
    assert any("out came as float16" in warning and "fp32" in warning for warning in case.warnings), case.warnings


@pytest.mark.torch
def test_torch_bfloat16_outputs_are_judged():
    torch = pytest.importorskip("torch")

    def core(*args):
        result = ref.latent_attention_core(*args)
        return {"out": torch.from_numpy(result["out"]).to(torch.bfloat16), "lse": torch.from_numpy(result["lse"]).float()}
    report = check(adapter(latent_attention_core=core), "bf16", "mla.core")
    assert report.ok and report.count("pass") == CORE_CASES, report.table()

    def wrong(*args):
        result = ref.latent_attention_core(*args)
        return {"out": torch.from_numpy(result["out"] * 1.5).to(torch.bfloat16), "lse": torch.from_numpy(result["lse"]).float()}
    case = check(adapter(latent_attention_core=wrong), "fp32", KERNEL_CASE).cases[0]
    assert case.status == "fail" and any("out came as torch.bfloat16" in warning for warning in case.warnings)


def test_ml_dtypes_bfloat16_outputs_are_judged():
    """JAX returns bfloat16 as an ml_dtypes array (dtype kind 'V'): it must be widened, not rejected."""
    ml_dtypes = pytest.importorskip("ml_dtypes")

    def core(*args):
        result = ref.latent_attention_core(*args)
        return {"out": ArrayLike(result["out"].astype(ml_dtypes.bfloat16)), "lse": result["lse"].astype(np.float32)}
    report = check(adapter(latent_attention_core=core), "bf16", "mla.core")
    assert report.ok and report.count("pass") == CORE_CASES, report.table()


def test_numpy_scalars_in_a_report_are_written_as_plain_json_numbers_and_booleans():
    """A comparison built from NumPy reductions may hold np.bool_, np.float32 or np.int64: the report is still strict JSON."""
    comparison = Comparison("out", np.bool_(False), "x", error_l2=np.float32(0.5), used=np.float64(np.inf),
                            worst_abs={"index": [np.int64(3), np.int64(1)], "candidate": np.float32(-0.25)})
    report = Report("a", "fp32", [CaseResult("c/tiny/seed0", "latent_attention_core", "kernel", "fail", comparisons=[comparison])])
    data = _strict_json(report.to_json())["cases"][0]["comparisons"][0]
    assert data["passed"] is False and data["error_l2"] == 0.5 and data["used"] == "inf"
    assert data["worst_abs"] == {"index": [3, 1], "candidate": -0.25}


def test_a_report_path_without_write_permission_is_refused_naming_it(tmp_path, monkeypatch):
    """The tests run as root, for whom every path is writable: os.access is made to say no."""
    from mla_ref.conformance import check as check_module
    monkeypatch.setattr(check_module.os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match=rf"^report: {tmp_path / 'report.json'} is not writable \(GOLDEN.report\)$"):
        check_module.check_report_path(tmp_path / "report.json")
