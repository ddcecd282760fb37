"""The independent DSA oracle (tests/independent_dsa.py) checked on its own: the Hadamard against its closed form,
the indexer RoPE as a rotation, a two-token case worked by hand, the top-k rule, and sparse MLA against dense MLA."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from conftest import attention_weights, hidden_states, preset, relative_error
from independent_dsa import _indexer_rope, slow_dsa_mla, slow_hadamard, slow_indexer_scores, slow_layer_norm, slow_topk
from independent_mla import slow_mla

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
