"""Bad input: every rejection is a typed error naming the tensor or field, expected vs actual, and the spec id."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import attention_weights, hidden_states, preset
from mla_ref import CacheError, InputError, LatentCache, NaiveCache, PagedLatentCache, ShapeError, WeightError, \
    latent_attention_core, mla_forward


@pytest.fixture
def tiny():
    config = preset("tiny")
    return config, attention_weights("tiny"), hidden_states(config, 2, 3)


def test_missing_weight(tiny):
    config, weights, hidden = tiny
    del weights["kv_b_proj.weight"]
    with pytest.raises(WeightError, match=r"kv_b_proj.weight: missing \(expected shape \[160, 32\]\).*\(MLA.weights\)"):
        mla_forward(config, weights, hidden)


def test_extra_weight(tiny):
    config, weights, hidden = tiny
    weights["q_proj.weight"] = np.zeros((128, 64))
    with pytest.raises(WeightError, match=r"q_proj.weight: unexpected tensor"):
        mla_forward(config, weights, hidden)


def test_weight_of_wrong_shape(tiny):
    config, weights, hidden = tiny
    weights["o_proj.weight"] = weights["o_proj.weight"].T
    with pytest.raises(WeightError, match=r"o_proj.weight: expected shape \[64, 96\], got \[96, 64\] \(MLA.weights\)"):
        mla_forward(config, weights, hidden)


def test_weight_of_wrong_dtype(tiny):
    config, weights, hidden = tiny
    weights["kv_a_layernorm.weight"] = np.ones(32, dtype=np.int32)
    with pytest.raises(WeightError, match=r"kv_a_layernorm.weight: expected a real floating dtype, got int32"):
        mla_forward(config, weights, hidden)


def test_weights_not_a_mapping(tiny):
    config, _, hidden = tiny
    with pytest.raises(WeightError, match=r"weights: expected a mapping"):
        mla_forward(config, [1, 2], hidden)


@pytest.mark.parametrize("shape, message", [
    ((3, 64), r"hidden: expected \[batch, seq, 64\], got \(3, 64\) \(MLA.1\)"),
    ((2, 3, 65), r"hidden: expected \[batch, seq, 64\], got \(2, 3, 65\) \(MLA.1\)"),
    ((1, 2, 3, 64), r"hidden: expected \[batch, seq, 64\], got \(1, 2, 3, 64\)"),
])
def test_hidden_of_wrong_rank_or_width(tiny, shape, message):
    config, weights, _ = tiny
    with pytest.raises(ShapeError, match=message):
        mla_forward(config, weights, np.zeros(shape))


def test_hidden_of_wrong_dtype(tiny):
    config, weights, hidden = tiny
    with pytest.raises(ShapeError, match=r"hidden: expected a real float array, got dtype complex128"):
        mla_forward(config, weights, hidden.astype(complex))


def test_negative_position(tiny):
    config, weights, hidden = tiny
    with pytest.raises(InputError, match=r"start_positions: expected values >= 0, got \[0, -1\] \(MLA.4\)"):
        mla_forward(config, weights, hidden, [0, -1])


def test_position_past_max_position_embeddings(tiny):
    config, weights, hidden = tiny
    with pytest.raises(InputError, match=r"positions: sequence 1 reaches position 4096, expected < max_position_embeddings = 4096 \(MLA.4\)"):
        mla_forward(config, weights, hidden, [0, 4094])


def test_start_positions_of_wrong_shape(tiny):
    config, weights, hidden = tiny
    with pytest.raises(ShapeError, match=r"start_positions: expected integers of shape \[2\], got float64 \[2\]"):
        mla_forward(config, weights, hidden, [0.0, 1.0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the caller allowed inf: inf - inf = NaN
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_hidden_is_rejected_unless_allowed(tiny, bad):
    config, weights, hidden = tiny
    hidden = hidden.copy()
    hidden[1, 2, 5] = bad
    with pytest.raises(InputError, match=r"hidden: contains (nan|inf|-inf) at index \(1, 2, 5\); pass allow_nonfinite=True.*\(MLA.1\)"):
        mla_forward(config, weights, hidden)
    result = mla_forward(config, weights, hidden, allow_nonfinite=True)
    assert np.isfinite(result.output[0]).all() and not np.isfinite(result.output[1, 2]).all()


def test_query_lengths_longer_than_seq(tiny):
    config, weights, hidden = tiny
    with pytest.raises(InputError, match=r"query_lengths: expected values <= seq = 3, got \[3, 4\] \(MLA.8\)"):
        mla_forward(config, weights, hidden, query_lengths=[3, 4])


def test_unknown_attention_form_and_dtype(tiny):
    config, weights, hidden = tiny
    with pytest.raises(InputError, match=r"attention: expected 'naive' or 'absorbed', got 'flash'"):
        mla_forward(config, weights, hidden, attention="flash")
    with pytest.raises(InputError, match=r"dtype: expected float64 or float32, got float16"):
        mla_forward(config, weights, hidden, dtype=np.float16)
    with pytest.raises(InputError, match=r"query_chunk: expected an int >= 1, got 0"):
        mla_forward(config, weights, hidden, query_chunk=0)
    with pytest.raises(InputError, match=r"query_chunk: expected an int >= 1, got 2.5"):
        mla_forward(config, weights, hidden, query_chunk=2.5)


def test_cache_from_another_config(tiny):
    config, weights, hidden = tiny
    other = preset("tiny-yarn")  # rows of 32 + 32 instead of 32 + 16
    with pytest.raises(CacheError, match=r"cache: built for another config"):
        mla_forward(config, weights, hidden, cache=LatentCache.empty(other, 2))
    same_widths = config.replace(rope_theta=50000.0)  # same shapes, different RoPE: rows mean something else
    with pytest.raises(CacheError, match=r"built for another config"):
        mla_forward(config, weights, hidden, cache=LatentCache.empty(same_widths, 2))


def test_cache_of_wrong_width_or_batch(tiny):
    config, weights, hidden = tiny
    raw = LatentCache(np.zeros((2, 0, 47)), np.zeros(2, np.int64))
    with pytest.raises(CacheError, match=r"cache: expected rows of latent_cache_width = 48, got 47 \(MLA.18\)"):
        mla_forward(config, weights, hidden, cache=raw)
    with pytest.raises(CacheError, match=r"cache: expected batch 2, got 3"):
        mla_forward(config, weights, hidden, cache=LatentCache.empty(config, 3))


def test_start_positions_must_match_the_cache(tiny):
    config, weights, hidden = tiny
    cache = mla_forward(config, weights, hidden, cache=LatentCache.empty(config, 2)).cache
    with pytest.raises(CacheError, match=r"start_positions: expected the cache lengths \[3, 3\], got \[0, 0\]"):
        mla_forward(config, weights, hidden, [0, 0], cache=cache)


def test_absorbed_needs_a_latent_cache(tiny):
    config, weights, hidden = tiny
    with pytest.raises(CacheError, match=r"absorbed attention needs a latent cache"):
        mla_forward(config, weights, hidden, cache=NaiveCache.empty(config, 2), attention="absorbed")


def test_block_table_pointing_outside_the_cache(tiny):
    config, _, _ = tiny
    cache = PagedLatentCache.empty(config, 2, 8, block_size=4)
    with pytest.raises(CacheError, match=r"block_table: entry \(1, 1\) = 9 points outside the pool of 4 blocks"):
        PagedLatentCache(cache.blocks, np.array([[0, 1], [2, 9]]), cache.lengths)


def test_block_table_that_overlaps(tiny):
    config, _, _ = tiny
    cache = PagedLatentCache.empty(config, 2, 8, block_size=4)
    with pytest.raises(CacheError, match=r"block_table: pool block 1 appears 2 times: blocks overlap \(MLA.19\)"):
        PagedLatentCache(cache.blocks, np.array([[0, 1], [1, 3]]), cache.lengths)


def test_block_table_without_a_block_for_held_tokens(tiny):
    config, _, _ = tiny
    cache = PagedLatentCache.empty(config, 2, 8, block_size=4)
    with pytest.raises(CacheError, match=r"block_table: entry \(0, 1\) is -1 but sequence 0 holds 5 tokens"):
        PagedLatentCache(cache.blocks, np.array([[0, -1], [2, 3]]), np.array([5, 0]))


def test_paged_cache_full(tiny):
    config, weights, hidden = tiny
    cache = PagedLatentCache.empty(config, 2, 2, block_size=2)
    with pytest.raises(CacheError, match=r"block_table: sequence 0 needs position 2, beyond its 1 blocks of 2"):
        mla_forward(config, weights, hidden, cache=cache)


def test_rollback_can_only_shrink(tiny):
    config, weights, hidden = tiny
    cache = mla_forward(config, weights, hidden, cache=LatentCache.empty(config, 2)).cache
    assert cache.truncate([1, 3]).lengths.tolist() == [1, 3]
    with pytest.raises(CacheError, match=r"lengths: rollback may only shrink: cache holds \[3, 3\], asked \[4, 3\]"):
        cache.truncate([4, 3])


def test_core_requires_the_model_scale_and_valid_shapes():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 2, 8))
    blocks = rng.standard_normal((2, 4, 1, 8))
    table, lengths = np.array([[0, 1]]), np.array([5])
    with pytest.raises(InputError, match=r"softmax_scale: expected a finite float > 0 .*got None \(MLA.17\)"):
        latent_attention_core(q, blocks, table, lengths, 6, None)
    with pytest.raises(ShapeError, match=r"k_cache: expected \[num_blocks, block_size, 1, 8\], got \(2, 4, 1, 9\)"):
        latent_attention_core(q, rng.standard_normal((2, 4, 1, 9)), table, lengths, 6, 0.1)
    with pytest.raises(InputError, match=r"head_dim_v: expected an int in 1 .. 8, got 9"):
        latent_attention_core(q, blocks, table, lengths, 9, 0.1)
    with pytest.raises(CacheError, match=r"cache_seqlens: sequence 0 holds 9 tokens, more than its 2 blocks of 4"):
        latent_attention_core(q, blocks, table, np.array([9]), 6, 0.1)
    with pytest.raises(ShapeError, match=r"block_table: expected \[1, max_blocks\], got \[2\]"):
        latent_attention_core(q, blocks, np.array([0, 1]), lengths, 6, 0.1)
    bad_q = q.copy()
    bad_q[0, 0, 1, 3] = np.nan
    with pytest.raises(InputError, match=r"q: contains nan at index \(0, 0, 1, 3\)"):
        latent_attention_core(bad_q, blocks, table, lengths, 6, 0.1)


def test_non_finite_weights_are_rejected(tiny):
    config, weights, hidden = tiny
    weights["kv_b_proj.weight"] = weights["kv_b_proj.weight"].copy()
    weights["kv_b_proj.weight"][3, 4] = np.nan
    with pytest.raises(WeightError, match=r"kv_b_proj.weight: contains nan at index \(3, 4\); expected finite values \(MLA.weights\)"):
        mla_forward(config, weights, hidden)


@pytest.mark.parametrize("kind", ["latent", "paged", "naive"])
def test_non_finite_cached_rows_are_rejected_unless_allowed(tiny, kind):
    config, weights, hidden = tiny
    empty = {"latent": LatentCache.empty(config, 2), "paged": PagedLatentCache.empty(config, 2, 8, block_size=4),
             "naive": NaiveCache.empty(config, 2)}[kind]
    cache = mla_forward(config, weights, hidden, cache=empty).cache
    if kind == "latent":
        cache = LatentCache(cache.rows.copy(), cache.lengths, cache.fingerprint)
        cache.rows[1, 2, 0] = np.nan
    elif kind == "paged":
        cache = PagedLatentCache(cache.blocks.copy(), cache.block_table, cache.lengths, cache.fingerprint)
        cache.blocks[cache.block_table[1, 0], 2, 0, 0] = np.nan
    else:
        cache = NaiveCache(cache.keys.copy(), cache.values, cache.lengths, cache.fingerprint)
        cache.keys[1, 2, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"cache: row of sequence 1 at position 2 \(< its length 4\) is not finite"):
        mla_forward(config, weights, hidden[:, :1], cache=cache)
    assert np.isnan(mla_forward(config, weights, hidden[:, :1], cache=cache, allow_nonfinite=True).output[1]).all()


def test_core_rejects_nan_in_a_used_slot():
    rng = np.random.default_rng(0)
    blocks = rng.standard_normal((2, 4, 1, 8))
    blocks[1, 1, 0, 5] = np.nan  # position 5 of the sequence: held, since cache_seqlens = 6
    with pytest.raises(InputError, match=r"k_cache: row of sequence 0 at position 5 \(< its length 6\) is not finite"):
        latent_attention_core(rng.standard_normal((1, 1, 2, 8)), blocks, np.array([[0, 1]]), np.array([6]), 6, np.float32(0.1))


def test_cache_dtype_must_be_the_compute_dtype(tiny):
    config, weights, hidden = tiny
    with pytest.raises(CacheError, match=r"cache: expected dtype float32 \(the compute dtype\), got float64"):
        mla_forward(config, weights, hidden, cache=LatentCache.empty(config, 2), dtype=np.float32)
    single = mla_forward(config, weights, hidden, cache=LatentCache.empty(config, 2, dtype=np.float32), dtype=np.float32)
    assert single.output.dtype == np.float32 and single.cache.dtype == np.float32
