"""examples/jax_mla.py through the conformance checker: accepted in float32, bfloat16 and float64; broken variants rejected.

Slow (XLA compiles every golden case once per dtype: ~45 s of CPU for fp32 and for bf16, ~20 s for the
fp64 cases; ~100 s in all on 2 cores) and skipped without JAX; run with ``pytest -m jax``. The adapter reads its dtype from MLA_REF_JAX_DTYPE at import, so each dtype
is a separate copy of the module, loaded from the source text under its own name (float64 last: it turns
on jax_enable_x64 for the whole process).

Every case must pass. A mismatch known and explained is listed in KNOWN_MISMATCHES, which turns that
profile's acceptance test into a strict xfail with the reason (it fails the run once the mismatch is gone);
none is listed: the kept-group order that used to be excused with a warning is aligned by the checker
(tests/test_checker.py::test_kept_groups_in_another_order_pass).
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")

from mla_ref.conformance.check import check  # noqa: E402
from mla_ref.golden.cases import case_config, case_definitions  # noqa: E402
from mla_ref.golden.generate import default_golden_dir  # noqa: E402
from mla_ref.golden.manifest import read_manifest  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.slow]  # slow: the CI step that installs JAX runs `pytest -m slow`

SOURCE = Path(__file__).resolve().parents[1] / "examples" / "jax_mla.py"

KNOWN_MISMATCHES: dict[str, str] = {}  # profile -> why the JAX adapter fails a case there (a strict xfail)


def load_adapter(dtype: str, name: str, replace: tuple[str, str] | None = None) -> types.ModuleType:
    """examples/jax_mla.py imported under ``name`` with MLA_REF_JAX_DTYPE = ``dtype``; ``replace`` edits one line of it."""
    text = SOURCE.read_text()
    if replace is not None:
        old, new = replace
        assert text.count(old) == 1, f"mutation target not found exactly once: {old!r}"
        text = text.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(SOURCE)
    sys.modules[name] = module
    previous = os.environ.get("MLA_REF_JAX_DTYPE")
    os.environ["MLA_REF_JAX_DTYPE"] = dtype
    try:
        exec(compile(text, f"{SOURCE} [{name}]", "exec"), module.__dict__)
    finally:
        if previous is None:
            os.environ.pop("MLA_REF_JAX_DTYPE")
        else:
            os.environ["MLA_REF_JAX_DTYPE"] = previous
    return module


DECLARED_UNSUPPORTED = ("FlashMLA's FP8 cache",)  # the port's declared gap (README): uint8 record caches (FP8.12)


def assert_accepted(module, profile: str, select: str | None = None) -> None:
    """Every case passes (a case whose entry point the adapter lacks is skipped: added to the protocol after it was written;
    a DSA case is unsupported: this adapter's MLA is dense; so is FlashMLA's FP8 record cache)."""
    report = check(module, profile, select=select)
    skipped_by_design = ("case has no ",)  # a case without this profile (the GC-FP8 cases carry fp8 only)
    dsa_cases = {definition["id"] for definition in case_definitions() if case_config(definition).sparse_attention}
    failing = [result for result in report.cases if result.status != "pass" and not (result.status == "skip" and (
        not hasattr(module, result.entry_point) or result.reason.startswith(skipped_by_design)))
               and not (result.status == "unsupported" and (result.case_id in dsa_cases or result.reason.startswith(DECLARED_UNSUPPORTED)))]
    assert not failing, f"{report.summary()}\n" + "\n".join(f"{r.case_id}: {r.status} {r.reason}" for r in failing) + "\n" + report.table()
    assert report.count("pass") > 0


FP64_CASES = ["mla.core.verify/tiny/sq4-seed0", "mla.prefill.yarn/tiny-mscale-mismatch/seed0", "mla.chunked/tiny-yarn/seed0",
              "moe.route.ties/tiny/seed0", "moe.layer/tiny/seed0", "moe.balance/tiny/seed0", "mtp.forward/tiny-dense/seed0"]


@pytest.mark.parametrize("dtype, profile", [
    pytest.param(dtype, profile, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_MISMATCHES[profile])] if profile in KNOWN_MISMATCHES else [])
    for dtype, profile in [("float32", "fp32"), ("bfloat16", "bf16")]])
def test_checker_accepts_the_jax_adapter(dtype, profile):
    assert_accepted(load_adapter(dtype, f"jax_mla_{dtype}"), profile)


MUTANTS = {
    "rope-half-split": (
        ("        first, second = wide[..., 0::2], wide[..., 1::2]\n", "        first, second = wide[..., :half], wide[..., half:]\n"),
        "mla.prefill/tiny/seed0", "MLA.4", "RoPE pairs in the other layout"),
    "bias-in-weights": (
        ("    weights = jnp.take_along_axis(scores, expert_ids, axis=1)\n", "    weights = jnp.take_along_axis(selection, expert_ids, axis=1)\n"),
        "moe.route.v3/tiny/seed0", "MOE.8", None),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_checker_rejects_a_broken_variant(mutant):
    replace, case_id, step, hint = MUTANTS[mutant]
    report = check(load_adapter("float32", f"jax_mla_mutant_{mutant.replace('-', '_')}", replace), "fp32", select=case_id)
    (result,) = report.cases
    assert result.status == "fail", report.table()
    assert result.first_divergent_step == step, report.table()
    assert any(c.name in ("output", "weights") and not c.passed for c in result.comparisons), report.table()
    if hint:
        assert any(hint in line for line in result.diagnosis), report.table()


def test_bad_input_names_the_entry_point_and_tensor():
    adapter = load_adapter("float32", "jax_mla_bad_input")
    q = np.zeros((1, 1, 2, 48))
    cache = np.zeros((2, 4, 1, 48))
    with pytest.raises(ValueError, match=r"latent_attention_core: block_table: entries must lie in \[-1, 2\)"):
        adapter.latent_attention_core(q, cache, np.array([[5]]), np.array([3]), 32, 0.1, False)
    with pytest.raises(ValueError, match="latent_attention_core: block_table: sequence 0 holds 3 positions"):
        adapter.latent_attention_core(q, cache, np.array([[-1]]), np.array([3]), 32, 0.1, False)
    with pytest.raises(ValueError, match=r"latent_attention_core: k_cache: expected shape \[\*, \*, 1, 48\]"):
        adapter.latent_attention_core(q, np.zeros((2, 4, 1, 40)), np.array([[0]]), np.array([3]), 32, 0.1, False)
    entry = read_manifest(default_golden_dir() / "manifest.yaml")["cases"]["mla.prefill/tiny/seed0"]
    with pytest.raises(ValueError, match=r"mla_prefill: hidden: expected shape \[\*, \*, 64\], got \(2, 5, 65\)"):
        adapter.mla_prefill(entry["config"], {}, np.zeros((2, 5, 65)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="mla_prefill: weight kv_a_proj_with_mqa.weight missing"):
        adapter.mla_prefill(entry["config"], {}, np.zeros((2, 5, 64)), np.zeros(2, np.int64))


def test_checker_accepts_the_jax_adapter_in_fp8():
    """Mode fp8 (jnp.float8_e4m3fn casts on the CPU): the GC-FP8 attention cases pass, the FP8 MoE case is declared unsupported."""
    report = check(load_adapter("fp8", "jax_mla_fp8"), "fp8", select="*fp8/tiny-fp8/*")
    assert {result.case_id: result.status for result in report.cases} == {
        "mla.prefill.fp8/tiny-fp8/seed0": "pass", "mla.decode.fp8/tiny-fp8/seed0": "pass", "moe.layer.fp8/tiny-fp8/seed0": "unsupported"}, report.table()


@pytest.mark.parametrize("case_id", FP64_CASES)
def test_checker_accepts_the_jax_adapter_in_float64(case_id):
    """One case per kind (XLA compiles each once more in float64); the last test of the file: it turns on jax_enable_x64."""
    assert_accepted(_float64_adapter(), "fp64", select=case_id)


@functools.lru_cache(maxsize=None)
def _float64_adapter() -> types.ModuleType:
    return load_adapter("float64", "jax_mla_float64")
