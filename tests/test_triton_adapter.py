"""The Triton MLA decode kernel (examples/triton_mla_decode.py) under the checker, run through Triton's CPU interpreter.

The checker must accept the kernel on every kernel-level case (``mla.core.*``) in fp32 and in
bf16, with and without split-KV, and reject one-line mutants of its source. Skipped when torch
or triton is missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from mla_ref.conformance.check import check

pytestmark = [pytest.mark.slow, pytest.mark.triton]


@pytest.fixture(autouse=True, scope="module")
def _needs_torch_and_triton():
    """Skip (not fail) without torch or triton; imported here so that collecting the default suite stays cheap."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU interpreter unless told otherwise
    pytest.importorskip("torch")
    pytest.importorskip("triton")


KERNEL = Path(__file__).resolve().parents[1] / "examples" / "triton_mla_decode.py"
CORE_CASES = 6  # mla.core.* in spec/golden.yaml with a float cache (the FP8 record case is unsupported here)


def load_kernel(path: Path = KERNEL, name: str = "triton_mla_decode_under_test"):
    """Import the kernel module from a file under its own module name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel():
    return load_kernel()


def run(module, dtype: str, splits: int):
    module.configure(dtype, splits)
    return check(module, module.PROFILE, select="mla.core")


@pytest.mark.parametrize("splits", [1, 3])
def test_fp32_kernel_is_accepted(kernel, splits):
    report = run(kernel, "float32", splits)
    assert report.profile == "fp32"
    assert report.ok and report.count("pass") == CORE_CASES, report.table()


@pytest.mark.parametrize("splits", [1, 3])
def test_bf16_kernel_is_accepted(kernel, splits):
    report = run(kernel, "bfloat16", splits)
    assert report.profile == "bf16"
    assert report.ok and report.count("pass") == CORE_CASES, report.table()


def mutant(tmp_path: Path, name: str, original: str, replacement: str):
    """The kernel module with one line changed, imported under another name."""
    source = KERNEL.read_text()
    assert source.count(original) == 1, f"mutant {name}: the line to change is not unique: {original!r}"
    path = tmp_path / f"triton_mla_decode_{name}.py"
    path.write_text(source.replace(original, replacement))
    return load_kernel(path, f"triton_mla_decode_{name}")


CANARY = ("    seqlen = tl.load(seqlens_ptr + batch_index)\n",
          "    seqlen = tl.load(seqlens_ptr + batch_index) + 1  # mutant: the canary slot is read and attended\n")
CAUSAL_SHIFT = ("        last_visible = seqlen - s_q + query_index  # [BLOCK_M], bottom-right aligned\n",
                "        last_visible = seqlen - s_q + query_index + 1  # mutant: each draft sees the next one\n")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_canary_mutant_is_rejected_and_named(tmp_path, dtype):
    report = run(mutant(tmp_path, "canary", *CANARY), dtype, splits=1)
    failed = [case for case in report.cases if case.status == "fail"]
    assert len(failed) == CORE_CASES, report.table()
    assert any("canary" in " ".join(case.diagnosis) for case in failed), report.table()


@pytest.mark.parametrize("splits", [1, 3])
def test_causal_shift_mutant_is_rejected(tmp_path, splits):
    report = run(mutant(tmp_path, "causal_shift", *CAUSAL_SHIFT), "float32", splits)
    failed = {case.case_id for case in report.cases if case.status == "fail"}
    assert failed == {"mla.core.verify/tiny/sq2-seed0", "mla.core.verify/tiny/sq4-seed0"}, report.table()


def test_bad_input_names_the_tensor(kernel):
    import numpy as np

    kernel.configure("float32", 1)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 1, 4, 48))
    cache = rng.standard_normal((4, 16, 1, 48))
    table = np.array([[0, 1], [2, -1]])
    seqlens = np.array([20, 5])
    good = dict(q=q, k_cache=cache, block_table=table, cache_seqlens=seqlens, head_dim_v=32, softmax_scale=0.2, causal=False)
    assert kernel.latent_attention_core(**good)["out"].shape == (2, 1, 4, 32)
    bad = [
        ({"k_cache": cache[..., :40]}, ValueError, "k_cache: expected [num_blocks, block_size, 1, 48]"),
        ({"q": q.astype(np.int64)}, TypeError, "q: expected a floating-point array"),
        ({"block_table": np.array([[0, 4], [2, -1]])}, ValueError, "block_table: entries must lie in [-1, 4)"),
        ({"block_table": table[:1]}, ValueError, "block_table: expected [2, max_blocks]"),
        ({"cache_seqlens": np.array([20, 17])}, ValueError, "block_table: sequence 1 holds 17 keys but logical block 1 is unallocated"),
        ({"cache_seqlens": np.array([33, 5])}, ValueError, "cache_seqlens: expected 0 .. 32"),
        ({"cache_seqlens": np.array([20.0, 5.0])}, TypeError, "cache_seqlens: expected an integer array"),
        ({"head_dim_v": 48}, ValueError, "head_dim_v: expected an int in 1 .. 47"),
        ({"softmax_scale": float("nan")}, ValueError, "softmax_scale: expected a finite float > 0"),
    ]
    for change, error, message in bad:
        with pytest.raises(error) as raised:
            kernel.latent_attention_core(**{**good, **change})
        assert message in str(raised.value), (change, str(raised.value))
