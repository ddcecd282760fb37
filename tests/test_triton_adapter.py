"""The Triton kernels (examples/triton_mla_decode.py) under the checker, run through Triton's CPU interpreter.

The checker must accept the dense decode kernel on every MLA kernel-level case (``mla.core.*``,
the FP8 record cache included) and the sparse kernel on FlashMLA's sparse contract
(``dsa.core.*``: DSA.13 decode on float rows and on FP8 records, DSA.14 prefill) in fp32 and in
bf16, with and without split-KV, and reject one-line mutants of their source, naming the
sparse ones. Skipped when torch or triton is missing. Each checker run takes a few seconds.
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
CORE_CASES = 8  # mla.core.* in spec/golden.yaml: seven on float rows (one with 64 heads), one on FP8 records
SPARSE_CASES = 7  # dsa.core.*: decode with pages of 16 and 64, decode on FP8 records, prefill; and each with 64 or 128 heads
MANY_HEADS = {"dsa.core.decode/tiny-yarn-h128/bs64-seed0", "dsa.core.decode.fp8/tiny-yarn-r512-h64/bs16-seed0",
              "dsa.core.prefill/tiny-yarn-h128/seed0"}  # more heads than one BLOCK_M (GC-HEADS)
SPARSE_DECODE = {"dsa.core.decode/tiny-yarn/bs16-seed0", "dsa.core.decode/tiny-yarn/bs64-seed0",
                 "dsa.core.decode.fp8/tiny-yarn-r512/bs16-seed0", "dsa.core.decode/tiny-yarn-h128/bs64-seed0",
                 "dsa.core.decode.fp8/tiny-yarn-r512-h64/bs16-seed0"}
SPARSE_PREFILL = {"dsa.core.prefill/tiny-yarn/seed0", "dsa.core.prefill/tiny-yarn-h128/seed0"}


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


def run(module, dtype: str, splits: int, select: str = "mla.core"):
    module.configure(dtype, splits)
    return check(module, module.PROFILE, select=select)


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


@pytest.mark.parametrize("dtype, profile", [("float32", "fp32"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("splits", [1, 3])  # 3: the bs16 cases' one tile of indices leaves two splits empty
def test_sparse_kernel_is_accepted(kernel, dtype, profile, splits):
    report = run(kernel, dtype, splits, select="dsa.core")
    assert report.profile == profile
    assert report.ok and report.count("pass") == SPARSE_CASES, report.table()


def mutant(tmp_path: Path, name: str, original: str, replacement: str):
    """The kernel module with one line changed, imported under another name."""
    source = KERNEL.read_text()
    assert source.count(original) == 1, f"mutant {name}: the line to change is not unique: {original!r}"
    path = tmp_path / f"triton_mla_decode_{name}.py"
    path.write_text(source.replace(original, replacement))
    return load_kernel(path, f"triton_mla_decode_{name}")


FP8_CASE = "mla.core.fp8/tiny-r512/bs16-seed0"
CANARY = ("    seqlen = tl.load(seqlens_ptr + batch_index)\n",
          "    seqlen = tl.load(seqlens_ptr + batch_index) + 1  # mutant: the canary slot is read and attended\n")
CAUSAL_SHIFT = ("        last_visible = seqlen - s_q + query_index  # [BLOCK_M], bottom-right aligned\n",
                "        last_visible = seqlen - s_q + query_index + 1  # mutant: each draft sees the next one\n")
ROW_BLOCK_IGNORED = ("    row = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M], row = query_index * heads + head\n",
                     "    row = tl.arange(0, BLOCK_M)  # mutant: every row block computes rows 0 .. BLOCK_M - 1\n")
HEAD_BLOCK_IGNORED = ("    head = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]; every head reads the query's rows\n",
                      "    head = tl.arange(0, BLOCK_M)  # mutant: every head block computes heads 0 .. BLOCK_M - 1\n")


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
    # not the 64-head case: its row blocks each hold one query, and a block loads no key past its last query's bound
    assert failed == {"mla.core.verify/tiny/sq2-seed0", "mla.core.verify/tiny/sq4-seed0"}, report.table()


def test_row_block_mutant_is_rejected_by_the_many_head_case_alone(tmp_path):
    """Every row block of the dense kernel computes rows 0 .. BLOCK_M - 1: the 4-head cases (at most 16 rows) hold one
    block, so only the 64-head case (GC-HEADS, 128 rows) rejects it."""
    report = run(mutant(tmp_path, "row_block", *ROW_BLOCK_IGNORED), "float32", splits=1)
    failed = {case.case_id for case in report.cases if case.status == "fail"}
    assert failed == {"mla.core.verify/tiny-yarn-h64/sq2-seed0"}, report.table()


def test_head_block_mutant_is_rejected_by_the_many_head_cases_alone(tmp_path):
    """Every head block of the sparse kernel computes heads 0 .. BLOCK_M - 1: invisible with 4 heads, rejected by
    the golden cases with 64 and 128 heads (GC-HEADS) without a hand-written test."""
    report = run(mutant(tmp_path, "head_block", *HEAD_BLOCK_IGNORED), "float32", splits=1, select="dsa.core")
    failed = {case.case_id for case in report.cases if case.status == "fail"}
    assert failed == MANY_HEADS, report.table()


# One-line bugs of the sparse kernel (DSA.13 / DSA.14 pitfalls in spec/dsa.yaml): the words the checker's diagnosis
# must use, the cases it must fail and those where it must name the bug. The prefill case reads one page, where
# page-major decoding is the identity; a page-major read of the cases with NaN in every unread slot reads NaN, which
# no variant of the reference reproduces, so only the page-64 case (finite decoys there) names it.
SPARSE_MUTANTS = {
    "minus_one_attended": (
        "        valid = (index >= 0) & (index < slots)  # DSA.14's rule; DSA.13's indices are -1 or in range\n",
        "        valid = index < slots  # mutant: -1 padding is clamped to row 0 and attended\n",
        "-1 padding attended", SPARSE_DECODE | SPARSE_PREFILL, SPARSE_DECODE),
    "page_major": (
        "        page = slot // block_size  # token encoding: index = page * block_size + offset (DSA.13)\n"
        "        offset = slot % block_size\n",
        "        page = slot % (slots // block_size)  # mutant: page-major decoding\n"
        "        offset = slot // (slots // block_size)\n",
        "indices decoded page-major", SPARSE_DECODE, {"dsa.core.decode/tiny-yarn/bs64-seed0"}),
    "base2_lse": (
        "    lse = tl.where(has_key, (m + tl.log2(l_safe)) * 0.6931471805599453, empty_lse)  # base-2 units to natural log\n",
        "    lse = tl.where(has_key, m + tl.log2(l_safe), empty_lse)  # mutant: FlashMLA's first release, base 2\n",
        "LSE in base 2", SPARSE_DECODE | SPARSE_PREFILL, SPARSE_DECODE | SPARSE_PREFILL),
    "default_scale": (
        "    scale_log2 = float(softmax_scale) / LN2  # logits in base-2 units: exp2(x * scale / ln 2) = exp(x * scale)\n",
        "    scale_log2 = width ** -0.5 / LN2  # mutant: FlashMLA's default softmax_scale 576^-0.5\n",
        "softmax scale 576^-0.5", SPARSE_DECODE | SPARSE_PREFILL, SPARSE_DECODE | SPARSE_PREFILL),
}


@pytest.mark.parametrize("name", sorted(SPARSE_MUTANTS))
def test_sparse_mutant_is_rejected_and_named(tmp_path, name):
    original, replacement, diagnosis, expected, named = SPARSE_MUTANTS[name]
    report = run(mutant(tmp_path, name, original, replacement), "float32", splits=1, select="dsa.core")
    failed = {case.case_id: " ".join(case.diagnosis) for case in report.cases if case.status == "fail"}
    assert set(failed) == expected, report.table()
    assert all(diagnosis in failed[case_id] for case_id in named), report.table()


def test_fp8_scales_read_as_bf16_are_rejected_and_named(tmp_path):
    """The record decoder (FP8.11) that both kernels share, with the float32 scales read as 2-byte bf16 values. Named on
    the dense case; on the sparse one the misread scales (up to ~1e36) overflow the kernel's fp32 logits, which the
    reference's variant (float64) does not reproduce, so there it is rejected unnamed."""
    module = mutant(tmp_path, "bf16_scales", "        scale_ptr = (row_ptr + head_dim_v).to(tl.pointer_type(tl.float32))",
                    "        scale_ptr = (row_ptr + head_dim_v).to(tl.pointer_type(tl.bfloat16))")
    module.configure("bfloat16", 1)
    report = check(module, module.PROFILE, select="fp8")
    failed = {case.case_id: " ".join(case.diagnosis) for case in report.cases if case.status == "fail"}
    assert set(failed) == {FP8_CASE, "dsa.core.decode.fp8/tiny-yarn-r512/bs16-seed0", "dsa.core.decode.fp8/tiny-yarn-r512-h64/bs16-seed0"}, report.table()
    assert "scales read as bf16" in failed[FP8_CASE], report.table()


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


def test_sparse_bad_input_names_the_tensor(kernel):
    import numpy as np

    kernel.configure("float32", 1)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 1, 4, 48))
    cache = rng.standard_normal((3, 16, 1, 48))
    indices = np.array([[[0, 47, -1]], [[16, -1, -1]]])
    good = dict(q=q, k_cache=cache, indices=indices, head_dim_v=32, softmax_scale=0.2)
    assert kernel.sparse_decode_core(**good)["out"].shape == (2, 1, 4, 32)
    bad = [
        ({"indices": np.array([[[0, 48, -1]], [[16, -1, -1]]])}, ValueError,
         "indices: expected -1 (padding) or page * block_size + offset in 0 .. 47, got 48 at [0, 0, 1] (DSA.13)"),
        ({"indices": np.array([[[0, -2, -1]], [[16, -1, -1]]])}, ValueError, "got -2 at [0, 0, 1]"),
        ({"indices": indices[:1]}, ValueError, "indices: expected [2, 1, topk]"),
        ({"indices": indices.astype(np.float64)}, TypeError, "indices: expected an integer array"),
        ({"k_cache": cache[..., :40]}, ValueError, "k_cache: expected [num_blocks, block_size, 1, 48]"),
        ({"k_cache": np.zeros((3, 16, 1, 48), np.uint8)}, ValueError, "head_dim_v: FP8 records hold one scale per 128"),
        ({"softmax_scale": -1.0}, ValueError, "softmax_scale: expected a finite float > 0"),
    ]
    for change, error, message in bad:
        with pytest.raises(error) as raised:
            kernel.sparse_decode_core(**{**good, **change})
        assert message in str(raised.value), (change, str(raised.value))
    prefill = dict(q=q[:, 0], kv=cache[0], indices=np.array([[[0, 16, -5]], [[2147483647, -2147483648, 3]]]),
                   softmax_scale=0.2, head_dim_v=32)
    result = kernel.sparse_prefill_core(**prefill)  # every int32 is an index; those outside 0 .. 15 are invalid
    assert result["out"].shape == (2, 4, 32) and np.isfinite(result["lse"]).all()
    with pytest.raises(ValueError, match=r"indices: expected int32 values \(FlashMLA's indices\), got 2147483648 at \[1, 0, 0\]"):
        kernel.sparse_prefill_core(**{**prefill, "indices": np.array([[[0, 1, 2]], [[2 ** 31, 0, 1]]])})


@pytest.mark.parametrize("splits", [1, 4])
def test_sparse_kernel_beyond_the_golden_shapes(kernel, splits):
    """Shapes the golden cases do not reach: a ragged last head block (20 heads; the golden 64 and 128 fill theirs), an index list of
    several tiles with a ragged end (37 entries), a repeated index (it counts twice, DSA.13), a page size of 5 (not
    a power of two); compared with the reference's DSA.13 and DSA.14 in float64."""
    import numpy as np

    from mla_ref.dsa_kernel import sparse_decode_core, sparse_prefill_core

    kernel.configure("float32", splits)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 3, 20, 40))
    cache = rng.standard_normal((9, 5, 1, 40))
    indices = rng.integers(-1, 45, size=(2, 3, 37))
    indices[1, 2, 5] = indices[1, 2, 6]
    result = kernel.sparse_decode_core(q, cache, indices, 32, 0.15)
    out, lse = sparse_decode_core(q, cache, indices, 32, 0.15)
    assert np.abs(result["out"] - out).max() < 1e-5 and np.abs(result["lse"] - lse).max() < 1e-5
    prefill = kernel.sparse_prefill_core(q[0], cache[:, 0], indices[0, :, None] * 3 - 40, 0.15, 32)  # indices -43 .. 92 over 9 rows
    out, lse = sparse_prefill_core(q[0], cache[:, 0], indices[0, :, None] * 3 - 40, 0.15, 32)
    finite = np.isfinite(lse)
    assert np.array_equal(np.isfinite(prefill["lse"]), finite) and np.all(prefill["lse"][~finite] == np.inf)
    assert not finite.all()  # a query with no valid index: out 0, lse +inf
    assert np.abs(prefill["out"] - out).max() < 1e-5 and np.abs(prefill["lse"][finite] - lse[finite]).max() < 1e-5
