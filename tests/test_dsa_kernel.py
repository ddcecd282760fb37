"""FlashMLA's sparse kernels (DSA.13, DSA.14) against the loop oracle of tests/independent_dsa.py and against dense MLA.17,
with invalid indices, all-invalid rows, repeated indices, NaN in every slot no index reads, and the bad inputs refused;
the golden sparse cases pass the loop oracles and name the contract's bugs built into them (diagnose.py variants)."""

from __future__ import annotations

import fnmatch
import functools
import math
import types

import numpy as np
import pytest

from conftest import relative_error
from independent_dsa import slow_sparse_decode, slow_sparse_prefill
from mla_ref import latent_attention_core
from mla_ref.conformance import check as check_module
from mla_ref.conformance.check import check
from mla_ref.dsa_kernel import sparse_decode_core, sparse_prefill_core
from mla_ref.errors import InputError, ShapeError
from mla_ref.fp8_cache import decode_latent_record, encode_latent_record
from mla_ref.golden.cases import case_config, case_definitions

TOL = 1e-12
SCALE = 0.1352337788608801  # V3.2's model scale (facts A1), not 576^-0.5


def paged_case(seed: int, batch=2, s_q=2, heads=3, width=20, head_dim_v=16, block_size=4, pages=6, topk=5):
    """q, a paged cache with NaN in every slot no index reads, and indices with -1 entries, an all-invalid query,
    a repeated index, and rows on several pages."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, s_q, heads, width))
    cache = rng.standard_normal((pages, block_size, 1, width))
    indices = rng.integers(0, pages * block_size, size=(batch, s_q, topk))
    indices[0, 0, 1] = -1
    indices[0, 0, 3] = indices[0, 0, 0]  # a repeated index counts twice
    indices[-1, -1] = -1  # nothing to attend
    unread = np.setdiff1d(np.arange(pages * block_size), indices)
    cache.reshape(-1, width)[unread] = np.nan
    return q, cache, indices, head_dim_v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_decode_equals_the_loop_oracle(seed):
    q, cache, indices, head_dim_v = paged_case(seed)
    out, lse = sparse_decode_core(q, cache, indices, head_dim_v, SCALE)
    expected_out, expected_lse = slow_sparse_decode(q, cache, indices, head_dim_v, SCALE)
    assert relative_error(out, expected_out) <= TOL
    assert np.array_equal(np.isinf(lse), np.isinf(expected_lse)) and np.all(lse[:, :, -1][-1] == np.inf)
    assert relative_error(lse[np.isfinite(lse)], expected_lse[np.isfinite(expected_lse)]) <= TOL
    assert np.all(out[-1, -1] == 0.0)


def test_sparse_decode_over_every_key_equals_dense_mla17():
    rng = np.random.default_rng(5)
    block_size, pages, width, head_dim_v = 4, 5, 12, 8
    cache = rng.standard_normal((pages, block_size, 1, width))
    table = np.array([[3, 0, 4], [1, 2, -1]])
    seqlens = np.array([10, 6])
    q = rng.standard_normal((2, 1, 2, width))
    dense_out, dense_lse = latent_attention_core(q, cache, table, seqlens, head_dim_v, SCALE)
    indices = np.full((2, 1, 12), -1)  # the token encoding: page * block_size + offset, padded with -1
    for b in range(2):
        tokens = [table[b, t // block_size] * block_size + t % block_size for t in range(seqlens[b])]
        indices[b, 0, :len(tokens)] = tokens
    out, lse = sparse_decode_core(q, cache, indices, head_dim_v, SCALE)
    assert relative_error(out, dense_out) <= TOL and relative_error(lse, dense_lse) <= TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_prefill_equals_the_loop_oracle(seed):
    rng = np.random.default_rng(seed)
    s_q, s_kv, heads, width, head_dim_v, topk = 4, 7, 2, 12, 8, 6
    q = rng.standard_normal((s_q, heads, width))
    kv = rng.standard_normal((s_kv, 1, width))
    indices = rng.integers(0, s_kv, size=(s_q, 1, topk))
    indices[0, 0, :3] = [-1, s_kv, -2147483648]  # FlashMLA's tests: any index < 0 or >= s_kv is invalid
    indices[1, 0, :] = [-123456, s_kv, 114514, 2147483647, -1, s_kv + 5]  # nothing to attend
    out, lse = sparse_prefill_core(q, kv, indices, SCALE, head_dim_v)
    expected_out, expected_lse = slow_sparse_prefill(q, kv, indices, SCALE, head_dim_v)
    assert relative_error(out, expected_out) <= TOL and np.all(out[1] == 0.0)
    assert np.all(lse[1] == np.inf)
    finite = np.isfinite(expected_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert relative_error(lse[finite], expected_lse[finite]) <= TOL


def test_minus_one_is_the_only_invalid_decode_index():
    q, cache, indices, head_dim_v = paged_case(0)
    bad = indices.copy()
    bad[1, 0, 2] = -2
    with pytest.raises(InputError, match=r"indices.*-1 \(invalid\).*got -2 at \[1, 0, 2\].*DSA.13"):
        sparse_decode_core(q, cache, bad, head_dim_v, SCALE)
    bad[1, 0, 2] = cache.shape[0] * cache.shape[1]
    with pytest.raises(InputError, match=r"indices.*0 \.\. 23.*got 24"):
        sparse_decode_core(q, cache, bad, head_dim_v, SCALE)


def test_bad_inputs_name_the_tensor_and_the_step():
    q, cache, indices, head_dim_v = paged_case(0)
    with pytest.raises(ShapeError, match=r"indices.*integer.*float64.*DSA.13"):
        sparse_decode_core(q, cache, indices.astype(np.float64), head_dim_v, SCALE)
    with pytest.raises(ShapeError, match=r"indices.*\[2, 2, topk\].*\(2, 5\)"):
        sparse_decode_core(q, cache, indices[:, 0], head_dim_v, SCALE)
    with pytest.raises(ShapeError, match=r"k_cache.*DSA.13"):
        sparse_decode_core(q, cache[..., :-1], indices, head_dim_v, SCALE)
    with pytest.raises(InputError, match=r"softmax_scale.*576\^-0.5.*DSA.13"):
        sparse_decode_core(q, cache, indices, head_dim_v, None)
    with pytest.raises(InputError, match=r"head_dim_v.*DSA.14"):
        sparse_prefill_core(q[0], cache[0], indices[:1].transpose(1, 0, 2), SCALE, 99)
    read = cache.copy()
    read.reshape(-1, cache.shape[-1])[indices[1, 0, 0]] = np.nan
    with pytest.raises(InputError, match=rf"k_cache.*row {indices[1, 0, 0]}.*not finite.*DSA.13"):
        sparse_decode_core(q, read, indices, head_dim_v, SCALE)


def test_float32_arithmetic_stays_close_to_float64():
    q, cache, indices, head_dim_v = paged_case(3)
    out64, lse64 = sparse_decode_core(q, cache, indices, head_dim_v, SCALE)
    out32, lse32 = sparse_decode_core(q, cache, indices, head_dim_v, SCALE, dtype=np.float32)
    assert out32.dtype == np.float32 and relative_error(out32, out64) <= 1e-5
    assert np.array_equal(lse32 == np.inf, lse64 == np.inf)


def loop_adapter(bug: str | None = None) -> types.SimpleNamespace:
    """The loop oracles behind the adapter protocol, with one FlashMLA-contract bug built in (or none)."""
    def indices_with_bug(indices, slots, num_blocks=None, block_size=None):
        indices = np.asarray(indices)
        if bug == "minus_one_as_row_0":
            return np.where(indices == -1, 0, indices)
        if bug == "page_major" and num_blocks is not None:
            return np.where(indices >= 0, (indices % num_blocks) * block_size + indices // num_blocks, indices)
        return indices

    def scale_with_bug(q, softmax_scale):
        return np.shape(q)[-1] ** -0.5 if bug == "scale_576" else softmax_scale

    def lse_with_bug(lse):
        return lse / math.log(2) if bug == "base_2" else lse

    def sparse_decode_core(q, k_cache, indices, head_dim_v, softmax_scale):
        num_blocks, block_size = np.shape(k_cache)[:2]
        out, lse = slow_sparse_decode(q, k_cache, indices_with_bug(indices, num_blocks * block_size, num_blocks, block_size),
                                      int(head_dim_v), scale_with_bug(q, softmax_scale))
        return {"out": out, "lse": lse_with_bug(lse)}

    def sparse_prefill_core(q, kv, indices, softmax_scale, head_dim_v):
        out, lse = slow_sparse_prefill(q, kv, indices_with_bug(indices, len(kv)), scale_with_bug(q, softmax_scale), int(head_dim_v))
        return {"out": out, "lse": lse_with_bug(lse)}

    return types.SimpleNamespace(sparse_decode_core=sparse_decode_core, sparse_prefill_core=sparse_prefill_core)


@pytest.fixture(scope="module")
def manifest_once():
    """check() parses golden/manifest.yaml on every call: parse it once for this module's checker runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(check_module, "read_manifest", functools.lru_cache(maxsize=None)(check_module.read_manifest))
        yield


# The 4-head sparse cases (presets tiny-yarn and tiny-yarn-r512); the loop oracles take seconds on the 64- and
# 128-head ones (GC-HEADS), which the slow test below runs.
FOUR_HEADS = "dsa.core*[n2]/*"
MANY_HEADS = "dsa.core*-h[0-9]*/*"


def sparse_case_ids(pattern: str) -> set[str]:
    return {definition["id"] for definition in case_definitions() if fnmatch.fnmatch(definition["id"], pattern)}


def test_the_head_patterns_split_the_sparse_cases():
    four, many = sparse_case_ids(FOUR_HEADS), sparse_case_ids(MANY_HEADS)
    assert len(four) == 4 and len(many) == 3 and not four & many and four | many == sparse_case_ids("dsa.core*")
    assert all(case_config(definition).num_attention_heads > 16 for definition in case_definitions() if definition["id"] in many)


def test_the_loop_oracles_pass_the_golden_sparse_cases(manifest_once):
    report = check(loop_adapter(), profile="fp64", select=FOUR_HEADS)
    assert report.ok and report.count("pass") == 4, report.table()


@pytest.mark.slow
def test_the_loop_oracles_pass_the_many_head_sparse_cases(manifest_once):
    report = check(loop_adapter(), profile="fp64", select=MANY_HEADS)
    assert report.ok and report.count("pass") == 3, report.table()


@pytest.mark.parametrize("bug, name", [("scale_576", "576^-0.5"), ("base_2", "LSE in base 2"),
                                       ("minus_one_as_row_0", "-1 padding attended: read as row 0"), ("page_major", "page-major")])
def test_sparse_contract_bugs_are_rejected_and_named(bug, name, manifest_once):
    failed = [case for case in check(loop_adapter(bug), profile="fp64", select=FOUR_HEADS).cases if case.status == "fail"]
    assert failed and any(case.diagnosis and name in case.diagnosis[0] for case in failed), [(case.case_id, case.diagnosis[:1]) for case in failed]


def test_sparse_decode_on_fp8_records_equals_decode_on_the_decoded_rows():
    """FP8.11 then DSA.13: records (656 bytes for kv_lora_rank 512, rope 64) read by the indices give exactly the float
    path on their decoded rows; 0x7F (NaN) bytes in the slots no index reads are never decoded."""
    rng = np.random.default_rng(7)
    pages, block_size, rank, rope = 3, 4, 512, 64
    rows = rng.standard_normal((pages * block_size, rank + rope))
    records = encode_latent_record(rows[:, :rank], rows[:, rank:])  # [slots, 656]
    indices = np.array([[[5, -1, 0, 11]], [[-1, -1, -1, -1]]])
    unread = np.setdiff1d(np.arange(pages * block_size), indices)
    records[unread] = 0x7F
    q = rng.standard_normal((2, 1, 2, rank + rope))
    out, lse = sparse_decode_core(q, records.reshape(pages, block_size, 1, -1), indices, rank, SCALE)
    slow_out, slow_lse = slow_sparse_decode(q, records.reshape(pages, block_size, 1, -1), indices, rank, SCALE)  # bytes by hand
    assert relative_error(out, slow_out) <= TOL and relative_error(lse[np.isfinite(lse)], slow_lse[np.isfinite(slow_lse)]) <= TOL
    decoded = decode_latent_record(records, rank, rope)
    decoded[unread] = np.nan
    expected_out, expected_lse = sparse_decode_core(q, decoded.reshape(pages, block_size, 1, -1), indices, rank, SCALE)
    assert np.array_equal(out, expected_out) and np.array_equal(lse, expected_lse)
    assert records.shape[-1] == 656 and np.all(lse[1] == np.inf)
