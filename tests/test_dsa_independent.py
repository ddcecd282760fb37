"""The independent DSA oracle (tests/independent_dsa.py) checked on its own — the Hadamard against its closed form,
the indexer RoPE as a rotation, a two-token case worked by hand, the top-k rule, sparse MLA against dense MLA — and
then the reference (mla_ref.dsa, mla_forward on a DSA config) against it on the tiny-dsa preset: scores, selected
index sets, output and LSE to 1e-12, in prefill, chunked prefill on a cached prefix and cached decode."""

from __future__ import annotations

import functools
import math
import types

import numpy as np
import pytest

from conftest import attention_weights, hidden_states, preset, relative_error
from independent_dsa import (_indexer_rope, slow_dsa_mla, slow_e4m3fn, slow_hadamard, slow_hadamard_apply, slow_indexer_scores,
                             slow_layer_norm, slow_topk)
from independent_mla import slow_mla
from mla_ref import mla_forward
from mla_ref.dsa import SparseCache, indexer_forward
from mla_ref.fp8 import decode_fp8
from mla_ref.trace import Trace
from mla_ref.weights import generate_attention_weights

TOL = 1e-12


def tiny_dsa_config(topk: int = 8, **changes):
    """The tiny preset's MLA fields plus a small indexer (2 heads of 32 = [16 rope | 16 nope]), as a plain namespace."""
    values = dict(vars(preset("tiny")))
    values.update(index_n_heads=2, index_head_dim=32, index_topk=topk, **changes)
    return types.SimpleNamespace(**values)


def indexer_weights(cfg, seed: int = 0) -> dict:
    """Random indexer tensors (names relative to self_attn.) beside the tiny preset's MLA tensors."""
    rng = np.random.default_rng(seed)
    weights = attention_weights("tiny", seed=seed)
    weights["indexer.wq_b.weight"] = rng.standard_normal((cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)) / math.sqrt(cfg.q_lora_rank)
    weights["indexer.wk.weight"] = rng.standard_normal((cfg.index_head_dim, cfg.hidden_size)) / math.sqrt(cfg.hidden_size)
    weights["indexer.k_norm.weight"] = 1.0 + 0.1 * rng.standard_normal(cfg.index_head_dim)
    weights["indexer.k_norm.bias"] = 0.1 * rng.standard_normal(cfg.index_head_dim)
    weights["indexer.weights_proj.weight"] = rng.standard_normal((cfg.index_n_heads, cfg.hidden_size)) / math.sqrt(cfg.hidden_size)
    return weights


@pytest.mark.parametrize("order", [1, 2, 8, 128])
def test_hadamard_is_the_normalised_popcount_matrix_and_orthogonal(order):
    matrix = slow_hadamard(order)
    closed_form = np.array([[(-1) ** bin(i & j).count("1") for j in range(order)] for i in range(order)]) / math.sqrt(order)
    assert np.array_equal(matrix, closed_form)  # scipy.linalg.hadamard / sqrt(n) (facts A1.5)
    assert np.abs(matrix @ matrix.T - np.eye(order)).max() <= TOL
    assert np.array_equal(matrix, matrix.T)


def test_the_butterfly_applies_the_sylvester_matrix():
    vector = np.random.default_rng(4).standard_normal(128)
    assert np.abs(slow_hadamard_apply(vector) - slow_hadamard(128) @ vector).max() <= TOL


def test_hadamard_rejects_an_order_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        slow_hadamard(96)


def test_indexer_rope_is_a_rotation_of_the_first_rope_dims_only():
    cfg = tiny_dsa_config()
    vector = np.random.default_rng(3).standard_normal(cfg.index_head_dim)
    for position in (0, 1, 37, 4000):
        rotated = _indexer_rope(vector, position, cfg)
        assert abs(np.linalg.norm(rotated) - np.linalg.norm(vector)) <= TOL * np.linalg.norm(vector)
        assert np.array_equal(rotated[cfg.qk_rope_head_dim:], vector[cfg.qk_rope_head_dim:])
    assert np.array_equal(_indexer_rope(vector, 0, cfg), vector)
    half = cfg.qk_rope_head_dim // 2  # the split-half pair (0, half) turns by position * 1 rad at frequency 1
    turned = _indexer_rope(vector, 1, cfg)
    assert abs(turned[0] - (vector[0] * math.cos(1.0) - vector[half] * math.sin(1.0))) <= TOL
    assert abs(turned[half] - (vector[0] * math.sin(1.0) + vector[half] * math.cos(1.0))) <= TOL


def test_layer_norm_centres_scales_and_adds_the_bias():
    normed = slow_layer_norm([1.0, 3.0], [2.0, 2.0], [0.5, -0.5], eps=0.0)
    assert normed.tolist() == [-1.5, 1.5]


def hand_config():
    """One indexer head of 2 dims, all rotated, plain RoPE at theta 10000 (frequency 1 for the only pair)."""
    return types.SimpleNamespace(hidden_size=2, q_lora_rank=2, rms_norm_eps=0.0, index_n_heads=1, index_head_dim=2,
                                 index_topk=1, qk_rope_head_dim=2, rope_theta=10000.0, rope_scaling_type=None)


@pytest.mark.parametrize("head_weight", [1.0, -1.0])
def test_two_tokens_worked_by_hand(head_weight):
    """x0 = e0 at position 0, x1 = e1 at position 1, identity projections, head weight +-1:
    q0 = [sqrt2, 0], q1 = R(1)[0, sqrt2]; k0 = c[1, -1], k1 = R(1) c[-1, 1] with c = 0.5 / sqrt(0.25 + 1e-6).
    q0.k0 = q1.k1 = sqrt2 c (one angle on both sides); q1.k0 = -sqrt2 c (sin 1 + cos 1) < 0, so ReLU gives 0
    before the head weight (1 head: weight factor 1, scale 2^-0.5)."""
    eye = np.eye(2)
    weights = {"q_a_proj.weight": eye, "q_a_layernorm.weight": np.ones(2), "indexer.wq_b.weight": eye,
               "indexer.wk.weight": eye, "indexer.k_norm.weight": np.ones(2), "indexer.k_norm.bias": np.zeros(2),
               "indexer.weights_proj.weight": np.array([[head_weight, head_weight]])}
    scores = slow_indexer_scores(hand_config(), weights, eye, [0, 1])
    c = 0.5 / math.sqrt(0.25 + 1e-6)
    expected = np.array([[head_weight * c, -np.inf], [0.0, head_weight * c]])
    assert np.array_equal(np.isinf(scores), np.isinf(expected))
    assert np.abs(scores[np.isfinite(expected)] - expected[np.isfinite(expected)]).max() <= TOL


def test_topk_rule_by_hand():
    assert slow_topk([3.0, -np.inf, 5.0, 1.0], 2) == [0, 2]
    assert slow_topk([3.0, -np.inf, 5.0, 1.0], 10) == [0, 2, 3]  # k clamped to the visible keys
    assert slow_topk([1.0, 1.0, 1.0], 2) == [0, 1]  # a tie goes to the lower index
    assert slow_topk([-np.inf, -2.0], 4) == [1]


def test_scores_do_not_depend_on_a_common_position_shift():
    cfg = tiny_dsa_config()
    weights = indexer_weights(cfg)
    hidden = hidden_states(cfg, 1, 6, seed=2)[0]
    at_zero = slow_indexer_scores(cfg, weights, hidden, range(6))
    shifted = slow_indexer_scores(cfg, weights, hidden, range(300, 306))
    finite = np.isfinite(at_zero)
    assert np.array_equal(finite, np.isfinite(shifted)) and np.array_equal(finite, np.tril(np.ones((6, 6), bool)))
    assert relative_error(shifted[finite], at_zero[finite]) <= 1e-11


def test_sparse_mla_with_k_over_the_visible_keys_is_dense_mla():
    cfg = tiny_dsa_config(topk=64)
    weights = indexer_weights(cfg, seed=1)
    hidden = hidden_states(cfg, 1, 9, seed=1)[0]
    out, lse, selected = slow_dsa_mla(cfg, weights, hidden, range(9))
    assert selected == [list(range(t + 1)) for t in range(9)]
    dense_out, dense_lse = slow_mla(cfg, weights, hidden, range(9))
    assert relative_error(out, dense_out) <= TOL and relative_error(lse, dense_lse) <= TOL


def test_sparse_mla_attends_exactly_the_top_k_keys():
    cfg = tiny_dsa_config(topk=3)
    weights = indexer_weights(cfg, seed=2)
    hidden = hidden_states(cfg, 1, 10, seed=2)[0]
    out, _, selected = slow_dsa_mla(cfg, weights, hidden, range(10))
    scores = slow_indexer_scores(cfg, weights, hidden, range(10))
    for t, chosen in enumerate(selected):
        assert len(chosen) == min(3, t + 1) and max(chosen) <= t
        left_out = [scores[t, s] for s in range(t + 1) if s not in chosen]
        assert all(scores[t, s] >= value for s in chosen for value in left_out)
    dense_out, _ = slow_mla(cfg, weights, hidden, range(10))
    assert relative_error(out[3:], dense_out[3:]) > 1e-3  # past k visible keys the sparsity shows
    assert relative_error(out[:3], dense_out[:3]) <= TOL


# ------------------------------------------------------------------ the reference against the oracle (tiny-dsa)

SEQ = 20  # past index_topk = 8, so most rows drop keys


@functools.lru_cache(maxsize=None)
def oracle(seed: int):
    """(config, weights, hidden [1, SEQ, hidden_size], scores, (out, lse, selected)) of the oracle on tiny-dsa."""
    config = preset("tiny-dsa")
    weights = generate_attention_weights(config, seed=seed)
    hidden = hidden_states(config, 1, SEQ, seed=seed)
    scores = slow_indexer_scores(config, weights, hidden[0], range(SEQ))
    return config, weights, hidden, scores, slow_dsa_mla(config, weights, hidden[0], range(SEQ))


def selected_sets(indices: np.ndarray) -> list[list[int]]:
    return [sorted(int(i) for i in row if i >= 0) for row in indices]


def test_the_tiny_dsa_inputs_have_a_gap_at_the_kth_score():
    """The selected set is well defined: every row past k visible keys separates its k-th and (k+1)-th score."""
    config, _, _, scores, _ = oracle(0)
    for t in range(config.index_topk, SEQ):
        ranked = np.sort(scores[t, : t + 1])[::-1]
        assert ranked[config.index_topk - 1] - ranked[config.index_topk] > 1e-6 * np.abs(ranked).max(), t


def test_reference_indexer_equals_the_oracle_in_prefill():
    config, weights, hidden, scores, (_, _, selected) = oracle(0)
    result = indexer_forward(config, weights, hidden)
    finite = np.isfinite(scores)
    assert np.array_equal(np.isfinite(result.scores[0]), finite)
    assert relative_error(result.scores[0][finite], scores[finite]) <= TOL
    assert selected_sets(result.indices[0]) == selected


def test_reference_sparse_prefill_equals_the_oracle():
    config, weights, hidden, _, (out, lse, _) = oracle(0)
    for attention in ("naive", "absorbed"):
        got = mla_forward(config, weights, hidden, [0], attention=attention)
        assert relative_error(got.output[0], out) <= TOL and relative_error(got.lse[0], lse) <= TOL, attention


@pytest.mark.parametrize("chunks", [[(0, 13), (13, 20)], [(0, 19), (19, 20)]], ids=["chunked-prefill", "decode"])
def test_reference_with_a_cache_equals_the_oracle(chunks):
    """A prefix, then the rest on the cache (bottom-right causal rule): scores, index sets, output and LSE of the new rows."""
    config, weights, hidden, scores, (out, lse, selected) = oracle(1)
    cache = SparseCache.empty(config, 1)
    for begin, end in chunks:
        trace = Trace()
        step = mla_forward(config, weights, hidden[:, begin:end], cache=cache, trace=trace)
        cache = step.cache
        masked = trace["DSA.9"]["masked_scores"][0]  # [new, keys]
        assert np.array_equal(np.isfinite(masked), np.isfinite(scores[begin:end, :end]))
        assert relative_error(masked[np.isfinite(masked)], scores[begin:end, :end][np.isfinite(masked)]) <= TOL
        assert selected_sets(trace["DSA.10"]["indices"][0]) == selected[begin:end]
        assert relative_error(step.output[0], out[begin:end]) <= TOL
        assert relative_error(step.lse[0], lse[:, begin:end]) <= TOL


def test_e4m3fn_by_hand_matches_the_facts_and_the_reference_decoder():
    """Facts B3: max finite 448 = 0x7E, min normal 2^-6 = 0x08, min subnormal 2^-9 = 0x01, 0x80 = -0, NaN only at
    0x7F / 0xFF; then all 256 codes against mla_ref's FP8.1 decoder."""
    assert (slow_e4m3fn(0x7E), slow_e4m3fn(0x08), slow_e4m3fn(0x01), slow_e4m3fn(0x38)) == (448.0, 2.0 ** -6, 2.0 ** -9, 1.0)
    assert math.copysign(1.0, slow_e4m3fn(0x80)) == -1.0 and slow_e4m3fn(0x80) == 0.0
    values = np.array([slow_e4m3fn(code) for code in range(256)])
    assert np.flatnonzero(np.isnan(values)).tolist() == [0x7F, 0xFF]
    reference = decode_fp8(np.arange(256, dtype=np.uint8))
    assert np.array_equal(values, reference, equal_nan=True)
