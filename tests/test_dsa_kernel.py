"""FlashMLA's sparse kernels (DSA.20, DSA.21) against the loop oracle of tests/independent_dsa.py and against dense MLA.17,
with invalid indices, all-invalid rows, repeated indices, NaN in every slot no index reads, and the bad inputs refused."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import relative_error
from independent_dsa import slow_sparse_decode, slow_sparse_prefill
from mla_ref import latent_attention_core
from mla_ref.dsa_kernel import sparse_decode_core, sparse_prefill_core
from mla_ref.errors import InputError, ShapeError

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
    with pytest.raises(InputError, match=r"indices.*-1 \(invalid\).*got -2 at \[1, 0, 2\].*DSA.20"):
        sparse_decode_core(q, cache, bad, head_dim_v, SCALE)
    bad[1, 0, 2] = cache.shape[0] * cache.shape[1]
    with pytest.raises(InputError, match=r"indices.*0 \.\. 23.*got 24"):
        sparse_decode_core(q, cache, bad, head_dim_v, SCALE)


def test_bad_inputs_name_the_tensor_and_the_step():
    q, cache, indices, head_dim_v = paged_case(0)
    with pytest.raises(ShapeError, match=r"indices.*integer.*float64.*DSA.20"):
        sparse_decode_core(q, cache, indices.astype(np.float64), head_dim_v, SCALE)
    with pytest.raises(ShapeError, match=r"indices.*\[2, 2, topk\].*\(2, 5\)"):
        sparse_decode_core(q, cache, indices[:, 0], head_dim_v, SCALE)
    with pytest.raises(ShapeError, match=r"k_cache.*DSA.20"):
        sparse_decode_core(q, cache[..., :-1], indices, head_dim_v, SCALE)
    with pytest.raises(InputError, match=r"softmax_scale.*576\^-0.5.*DSA.20"):
        sparse_decode_core(q, cache, indices, head_dim_v, None)
    with pytest.raises(InputError, match=r"head_dim_v.*DSA.21"):
        sparse_prefill_core(q[0], cache[0], indices[:1].transpose(1, 0, 2), SCALE, 99)
    read = cache.copy()
    read.reshape(-1, cache.shape[-1])[indices[1, 0, 0]] = np.nan
    with pytest.raises(InputError, match=rf"k_cache.*row {indices[1, 0, 0]}.*not finite.*DSA.20"):
        sparse_decode_core(q, read, indices, head_dim_v, SCALE)


def test_float32_arithmetic_stays_close_to_float64():
    q, cache, indices, head_dim_v = paged_case(3)
    out64, lse64 = sparse_decode_core(q, cache, indices, head_dim_v, SCALE)
    out32, lse32 = sparse_decode_core(q, cache, indices, head_dim_v, SCALE, dtype=np.float32)
    assert out32.dtype == np.float32 and relative_error(out32, out64) <= 1e-5
    assert np.array_equal(lse32 == np.inf, lse64 == np.inf)
