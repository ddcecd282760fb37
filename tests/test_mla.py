"""MLA invariants in float64 (relative error <= 1e-12), driven by hypothesis.

absorbed == naive; token-by-token decode == one prefill; any chunking == the whole
prefill; paged cache == contiguous cache; ragged batch == each sequence alone; the slow
independent oracle (tests/independent_mla.py) == the vectorised code; interleaved layout
== half layout with permuted weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import attention_weights, hidden_states, preset, relative_error
from independent_mla import slow_latent_core, slow_mla
from mla_ref import LatentCache, NaiveCache, PagedLatentCache, latent_attention_core, mla_forward
from mla_ref.config import from_dict
from mla_ref.rope import softmax_scale
from mla_ref.weights import attention_weights_for_half_layout, generate_attention_weights

TOL = 1e-12
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    """Small MLA configs: any head count, q compression or not, YaRN or not, either layout."""
    yarn = draw(st.booleans())
    values = {
        "name": "drawn", "vocab_size": 11, "hidden_size": draw(st.integers(4, 24)), "num_hidden_layers": 1,
        "max_position_embeddings": 200_000, "num_attention_heads": draw(st.integers(1, 5)),
        "q_lora_rank": draw(st.one_of(st.none(), st.integers(2, 12))), "kv_lora_rank": draw(st.integers(2, 16)),
        "qk_nope_head_dim": draw(st.integers(1, 9)), "qk_rope_head_dim": 2 * draw(st.integers(1, 10)),
        "v_head_dim": draw(st.integers(1, 9)), "rope_layout": draw(st.sampled_from(["interleaved", "half"])),
        "intermediate_size": 4, "moe_intermediate_size": 2, "n_routed_experts": 2, "num_experts_per_tok": 1,
    }
    if yarn:
        values.update(rope_scaling_type="yarn", rope_factor=draw(st.sampled_from([4.0, 40.0])),
                      original_max_position_embeddings=draw(st.sampled_from([64, 4096])),
                      mscale=draw(st.sampled_from([0.707, 1.0])), mscale_all_dim=draw(st.sampled_from([0.0, 0.707, 1.0])))
    return from_dict(values)


def weights_for(config, seed=0):
    return generate_attention_weights(config, seed=seed)


def prefill(config, weights, hidden, starts, **kwargs):
    return mla_forward(config, weights, hidden, np.asarray(starts), **kwargs)


@SETTINGS
@given(config=configs(), seq=st.integers(1, 9), start=st.integers(0, 100_000), seed=st.integers(0, 99))
def test_absorbed_equals_naive(config, seq, start, seed):
    weights = weights_for(config, seed)
    hidden = hidden_states(config, 2, seq, seed)
    naive = prefill(config, weights, hidden, [start, 3])
    absorbed = prefill(config, weights, hidden, [start, 3], attention="absorbed")
    assert relative_error(absorbed.output, naive.output) <= TOL
    assert relative_error(absorbed.lse, naive.lse) <= TOL


@SETTINGS
@given(config=configs(), seq=st.integers(1, 8), seed=st.integers(0, 99), cache_kind=st.sampled_from(["latent", "naive", "paged"]),
       attention=st.sampled_from(["naive", "absorbed"]))
def test_token_by_token_decode_equals_prefill(config, seq, seed, cache_kind, attention):
    if cache_kind == "naive" and attention == "absorbed":
        attention = "naive"
    weights = weights_for(config, seed)
    hidden = hidden_states(config, 2, seq, seed)
    whole = prefill(config, weights, hidden, [0, 0])
    cache = {"latent": LatentCache.empty(config, 2), "naive": NaiveCache.empty(config, 2),
             "paged": PagedLatentCache.empty(config, 2, seq, block_size=3, shuffle_seed=seed)}[cache_kind]
    outputs, lses = [], []
    for token in range(seq):
        step = mla_forward(config, weights, hidden[:, token:token + 1], cache=cache, attention=attention)
        cache = step.cache
        outputs.append(step.output)
        lses.append(step.lse)
    assert relative_error(np.concatenate(outputs, axis=1), whole.output) <= TOL
    assert relative_error(np.concatenate(lses, axis=2), whole.lse) <= TOL
    assert cache.lengths.tolist() == [seq, seq]


@SETTINGS
@given(config=configs(), seq=st.integers(2, 12), data=st.data(), attention=st.sampled_from(["naive", "absorbed"]))
def test_any_chunking_equals_the_whole_prefill(config, seq, data, attention):
    weights = weights_for(config)
    hidden = hidden_states(config, 1, seq, 1)
    whole = prefill(config, weights, hidden, [0])
    cuts = sorted(data.draw(st.sets(st.integers(1, seq - 1), max_size=4)))
    cache = LatentCache.empty(config, 1) if attention == "absorbed" else NaiveCache.empty(config, 1)
    outputs = []
    for begin, end in zip([0] + cuts, cuts + [seq]):
        step = mla_forward(config, weights, hidden[:, begin:end], cache=cache, attention=attention)
        cache = step.cache
        outputs.append(step.output)
    assert relative_error(np.concatenate(outputs, axis=1), whole.output) <= TOL
    chunk = data.draw(st.integers(1, seq))
    assert relative_error(prefill(config, weights, hidden, [0], query_chunk=chunk).output, whole.output) <= TOL
    assert relative_error(prefill(config, weights, hidden, [0], query_chunk=chunk, attention="absorbed").output, whole.output) <= TOL


@SETTINGS
@given(config=configs(), data=st.data())
def test_paged_cache_equals_contiguous_cache(config, data):
    weights = weights_for(config)
    prefix, new = data.draw(st.integers(0, 10)), data.draw(st.integers(1, 4))
    block_size = data.draw(st.sampled_from([1, 2, 3, 5, 64]))
    hidden = hidden_states(config, 3, prefix + new, 2)
    paged = PagedLatentCache.empty(config, 3, prefix + new, block_size=block_size, extra_blocks=data.draw(st.integers(0, 3)),
                                   shuffle_seed=data.draw(st.integers(0, 1000)))
    contiguous = LatentCache.empty(config, 3)
    if prefix:
        paged = mla_forward(config, weights, hidden[:, :prefix], cache=paged).cache
        contiguous = mla_forward(config, weights, hidden[:, :prefix], cache=contiguous).cache
    from_paged = mla_forward(config, weights, hidden[:, prefix:], cache=paged)
    from_contiguous = mla_forward(config, weights, hidden[:, prefix:], cache=contiguous)
    assert relative_error(from_paged.output, from_contiguous.output) <= TOL
    assert np.array_equal(from_paged.cache.key_rows(), from_contiguous.cache.key_rows())


@SETTINGS
@given(config=configs(), data=st.data(), attention=st.sampled_from(["naive", "absorbed"]))
def test_ragged_batch_equals_each_sequence_alone(config, data, attention):
    weights = weights_for(config)
    batch = 3
    prefixes = np.array(data.draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch)))
    new_lengths = np.array(data.draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch)))
    seq = max(1, int(new_lengths.max()))
    hidden = hidden_states(config, batch, int(prefixes.max()) + seq, 3)
    cache = LatentCache.empty(config, batch) if attention == "absorbed" else NaiveCache.empty(config, batch)
    cache = mla_forward(config, weights, hidden[:, : int(prefixes.max())], cache=cache, query_lengths=prefixes).cache
    new_hidden = np.stack([hidden[b, prefixes[b]: prefixes[b] + seq] if prefixes[b] + seq <= hidden.shape[1]
                           else np.pad(hidden[b, prefixes[b]:], ((0, prefixes[b] + seq - hidden.shape[1]), (0, 0)))
                           for b in range(batch)])
    together = mla_forward(config, weights, new_hidden, cache=cache, query_lengths=new_lengths)
    for b in range(batch):
        alone = prefill(config, weights, hidden[b:b + 1, : prefixes[b] + new_lengths[b]], [0])
        got = together.output[b, : new_lengths[b]]
        assert relative_error(got, alone.output[0, prefixes[b]:]) <= TOL
        assert np.all(together.output[b, new_lengths[b]:] == 0.0)  # padding gives 0
        assert np.all(together.lse[b, :, new_lengths[b]:] == -np.inf)
    assert together.cache.lengths.tolist() == (prefixes + new_lengths).tolist()


@pytest.mark.parametrize("start", [0, 37, 5000, 70_000])
def test_vectorised_equals_the_slow_independent_oracle(tiny_name, start):
    config = preset(tiny_name)
    start = min(start, config.max_position_embeddings - 7)
    weights = attention_weights(tiny_name, seed=1)
    hidden = hidden_states(config, 1, 7, seed=start)
    positions = list(range(start, start + 7))
    expected_out, expected_lse = slow_mla(config, weights, hidden[0], positions)
    for attention in ("naive", "absorbed"):
        got = prefill(config, weights, hidden, [start], attention=attention)
        assert relative_error(got.output[0], expected_out) <= TOL
        assert relative_error(got.lse[0], expected_lse) <= TOL


@SETTINGS
@given(config=configs(), start=st.integers(0, 150_000), seed=st.integers(0, 99))
def test_drawn_configs_equal_the_slow_oracle(config, start, seed):
    weights = weights_for(config, seed)
    hidden = hidden_states(config, 1, 5, seed)
    expected_out, expected_lse = slow_mla(config, weights, hidden[0], list(range(start, start + 5)))
    got = prefill(config, weights, hidden, [start])
    assert relative_error(got.output[0], expected_out) <= TOL
    assert relative_error(got.lse[0], expected_lse) <= TOL


@SETTINGS
@given(config=configs(), data=st.data())
def test_latent_core_equals_the_slow_oracle_with_poisoned_slots(config, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    batch, s_q, heads = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    block_size = data.draw(st.sampled_from([1, 4, 64]))
    seqlens = np.array(data.draw(st.lists(st.integers(0, 20), min_size=batch, max_size=batch)))
    width, head_dim_v = config.latent_cache_width, config.kv_lora_rank
    per_sequence = max(1, -(-int(seqlens.max()) // block_size))
    blocks = rng.standard_normal((batch * per_sequence + 2, block_size, 1, width))
    table = rng.permutation(blocks.shape[0])[: batch * per_sequence].reshape(batch, per_sequence)
    for b in range(batch):  # NaN in every slot a sequence does not hold, and a canary key right after it
        for position in range(seqlens[b], per_sequence * block_size):
            blocks[table[b, position // block_size], position % block_size] = np.nan
        if seqlens[b] < per_sequence * block_size:
            blocks[table[b, seqlens[b] // block_size], seqlens[b] % block_size] = 1e6
    blocks[np.setdiff1d(np.arange(blocks.shape[0]), table)] = np.nan
    q = rng.standard_normal((batch, s_q, heads, width))
    scale = softmax_scale(config)
    for causal in (False, True):
        out, lse = latent_attention_core(q, blocks, table, seqlens, head_dim_v, scale, causal)
        expected_out, expected_lse = slow_latent_core(q, blocks, table, seqlens, head_dim_v, scale, causal)
        assert not np.isnan(out).any()
        assert relative_error(out, expected_out) <= TOL
        finite = np.isfinite(expected_lse)
        assert np.array_equal(np.isfinite(lse), finite) and np.all(lse[~finite] == -np.inf)
        assert relative_error(lse[finite], expected_lse[finite]) <= TOL


def test_decode_through_the_core_equals_the_layer():
    """The layer's absorbed decode is the FlashMLA-layout core plus W_UK / W_UV and o_proj."""
    config = preset("tiny-yarn")
    weights = attention_weights("tiny-yarn")
    hidden = hidden_states(config, 2, 6, 4)
    cache = PagedLatentCache.empty(config, 2, 8, block_size=4, shuffle_seed=1)
    cache = mla_forward(config, weights, hidden[:, :4], cache=cache, start_positions=[0, 0]).cache
    from mla_ref.mla import absorb_query, kv_latent_and_rope_key, query_heads, query_latent, rotate_query_key, \
        unabsorb_output, output_projection
    step = mla_forward(config, weights, hidden[:, 4:6], cache=cache)
    positions = np.array([[4, 5], [4, 5]])
    q_nope, q_pe = query_heads(config, query_latent(hidden[:, 4:6], weights, config.rms_norm_eps), weights)
    _, k_pe_raw = kv_latent_and_rope_key(config, hidden[:, 4:6], weights)
    q_pe, _ = rotate_query_key(config, q_pe, k_pe_raw, positions)
    _, q_latent = absorb_query(config, q_nope, q_pe, weights)
    out, lse = latent_attention_core(q_latent, step.cache.blocks, step.cache.block_table, step.cache.lengths,
                                     config.kv_lora_rank, softmax_scale(config), causal=True)
    assert relative_error(output_projection(unabsorb_output(config, out, weights), weights), step.output) <= TOL
    assert relative_error(lse, step.lse) <= TOL


@SETTINGS
@given(config=configs(), start=st.integers(0, 100_000))
def test_interleaved_equals_half_layout_with_permuted_weights(config, start):
    canonical = config.replace(rope_layout="interleaved")
    weights = weights_for(canonical)
    hidden = hidden_states(config, 2, 5, 5)
    expected = prefill(canonical, weights, hidden, [start, 0])
    half = prefill(canonical.replace(rope_layout="half"), attention_weights_for_half_layout(canonical, weights), hidden, [start, 0])
    assert relative_error(half.output, expected.output) <= TOL
    if config.qk_rope_head_dim >= 4:  # with one pair the two layouts coincide
        unpermuted = prefill(canonical.replace(rope_layout="half"), weights, hidden, [start, 0])
        assert relative_error(unpermuted.output, expected.output) > 1e-6


def test_float32_works_and_stays_close():
    config = preset("tiny-yarn")
    weights = attention_weights("tiny-yarn")
    hidden = hidden_states(config, 2, 9, 6)
    reference = prefill(config, weights, hidden, [0, 4000])
    single = prefill(config, {k: v.astype(np.float32) for k, v in weights.items()}, hidden.astype(np.float32), [0, 4000], dtype=np.float32)
    assert single.output.dtype == np.float32
    assert relative_error(single.output, reference.output) < 1e-5


def test_zero_length_queries_give_zero_output_and_minus_inf_lse():
    config = preset("tiny")
    weights = attention_weights("tiny")
    hidden = hidden_states(config, 2, 3, 7)
    result = prefill(config, weights, hidden, [0, 0], query_lengths=[0, 3])
    assert np.all(result.output[0] == 0.0) and np.all(result.lse[0] == -np.inf)
    assert relative_error(result.output[1], prefill(config, weights, hidden[1:], [0]).output[0]) <= TOL


def test_scale_matters_with_many_keys_but_not_with_one():
    """Position 0 hides a wrong softmax scale (bugs-in-the-wild 0.1): the first token's output ignores it."""
    config = preset("tiny-yarn")
    weights = attention_weights("tiny-yarn")
    hidden = hidden_states(config, 1, 6, 8)
    right = prefill(config, weights, hidden, [0])
    wrong = prefill(config.replace(mscale_all_dim=0.0), weights, hidden, [0])
    assert relative_error(wrong.output[:, 0], right.output[:, 0]) <= TOL
    assert relative_error(wrong.output[:, 1:], right.output[:, 1:]) > 1e-3


def test_lse_is_the_natural_log_of_the_visible_scaled_logits():
    from mla_ref import Trace
    config = preset("tiny-v2")
    trace = Trace()
    result = mla_forward(config, attention_weights("tiny-v2"), hidden_states(config, 2, 5, 9), [0, 10], trace=trace)
    logits, visible = trace["MLA.9"]["logits"], trace["MLA.8"]["visible"]
    for b in range(2):
        for h in range(config.num_attention_heads):
            for i in range(5):
                expected = np.logaddexp.reduce(logits[b, h, i, visible[b, i]])
                assert abs(result.lse[b, h, i] - expected) <= 1e-13 * abs(expected) + 1e-13
