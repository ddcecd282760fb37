"""Properties the router and the MoE layer must have (spec/moe.yaml conventions), and exact ties.

Property tests use continuous random inputs (no near ties); the tie tests craft exact ties.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from independent_moe import small_config
from mla_ref.moe import (expert_selection, ffn_forward, group_mask, group_scores, group_selection, route,
                         routing_weights)
from mla_ref.weights import generate_weights, layer_weight_shapes, subtree

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIAS = "mlp.gate.e_score_correction_bias"


@st.composite
def grouped_configs(draw, **fixed):
    n_group = draw(st.integers(1, 4))
    per_group = draw(st.integers(1, 4))
    topk_group = draw(st.integers(1, n_group))
    fields = dict(
        n_routed_experts=n_group * per_group, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=draw(st.integers(1, topk_group * per_group)),
        scoring_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        topk_method=draw(st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"])),
        group_score_rule=draw(st.sampled_from([None, "max", "top2_sum"])),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])),
        n_shared_experts=draw(st.integers(0, 2)),
    )
    fields.update(fixed)
    return small_config(**fields)


def router_tensors(config, seed, bias_shift=0.0):
    rng = np.random.default_rng(seed)
    tensors = {"mlp.gate.weight": rng.standard_normal((config.n_routed_experts, config.hidden_size))}
    if config.has_correction_bias:
        tensors[BIAS] = 0.3 * rng.standard_normal(config.n_routed_experts) + bias_shift
    return tensors


def hidden_states(config, seed, tokens=7):
    return np.random.default_rng(seed + 1).standard_normal((tokens, config.hidden_size))


# ---------------------------------------------------------------------------- routing properties

@PROPERTY
@given(grouped_configs(group_mask_fill="-inf"), st.integers(0, 2**16))
def test_chosen_experts_lie_in_kept_groups(config, seed):
    routing = route(config, router_tensors(config, seed, bias_shift=-1.0), hidden_states(config, seed))
    per_group = config.n_routed_experts // config.n_group
    for groups, ids in zip(routing.kept_groups, routing.expert_ids):
        assert set((ids // per_group).tolist()) <= set(groups.tolist())


@PROPERTY
@given(grouped_configs(n_group=1, topk_group=1), st.integers(0, 2**16))
def test_one_group_is_plain_top_k(config, seed):
    tensors = router_tensors(config, seed)
    routing = route(config, tensors, hidden_states(config, seed))
    assert np.all(routing.group_margin == np.inf)
    for row, ids in zip(routing.selection, routing.expert_ids):
        plain = sorted(range(config.n_routed_experts), key=lambda e: (-row[e], e))[: config.num_experts_per_tok]
        assert ids.tolist() == plain


@PROPERTY
@given(grouped_configs(), st.integers(0, 2**16))
def test_keeping_every_group_equals_one_group(config, seed):
    everything = config.replace(topk_group=config.n_group)
    one = config.replace(n_group=1, topk_group=1)
    tensors, hidden = router_tensors(config, seed), hidden_states(config, seed)
    np.testing.assert_array_equal(route(everything, tensors, hidden).expert_ids, route(one, tensors, hidden).expert_ids)


@PROPERTY
@given(grouped_configs(topk_method="noaux_tc", group_mask_fill="-inf"), st.integers(0, 2**16), st.sampled_from([-3.0, 0.5, 7.0]))
def test_adding_a_constant_to_the_bias_changes_nothing(config, seed, constant):
    tensors, hidden = router_tensors(config, seed), hidden_states(config, seed)
    shifted = {**tensors, BIAS: tensors[BIAS] + constant}
    base, moved = route(config, tensors, hidden), route(config, shifted, hidden)
    np.testing.assert_array_equal(base.expert_ids, moved.expert_ids)
    np.testing.assert_array_equal(base.kept_groups, moved.kept_groups)
    np.testing.assert_array_equal(base.weights, moved.weights)
    np.testing.assert_allclose(base.expert_margin, moved.expert_margin, atol=1e-12)
    np.testing.assert_allclose(base.group_margin, moved.group_margin, atol=1e-12)


@PROPERTY
@given(grouped_configs(), st.integers(0, 2**16))
def test_permuting_tokens_permutes_outputs(config, seed):
    layer = 1
    tensors = subtree(generate_weights(config, seed, shapes=layer_weight_shapes(config, layer)), f"model.layers.{layer}.")
    hidden = hidden_states(config, seed, tokens=6)
    permutation = np.random.default_rng(seed).permutation(len(hidden))
    base, permuted = ffn_forward(config, tensors, hidden, layer), ffn_forward(config, tensors, hidden[permutation], layer)
    np.testing.assert_array_equal(permuted.routing.expert_ids, base.routing.expert_ids[permutation])
    np.testing.assert_allclose(permuted.routing.weights, base.routing.weights[permutation], rtol=1e-14)
    np.testing.assert_allclose(permuted.output, base.output[permutation], rtol=1e-12, atol=1e-12)


@PROPERTY
@given(grouped_configs(norm_topk_prob=True, topk_norm_rule="norm_topk_prob"), st.integers(0, 2**16),
       st.sampled_from([0.0, 1e-20]))
def test_renormalised_weights_sum_to_the_routed_scale(config, seed, epsilon):
    config = config.replace(topk_norm_epsilon=epsilon)
    weights = route(config, router_tensors(config, seed), hidden_states(config, seed)).weights
    np.testing.assert_allclose(weights.sum(axis=-1), config.routed_scaling_factor, rtol=1e-14)


def test_official_rule_renormalises_sigmoid_only():
    base = dict(n_routed_experts=8, num_experts_per_tok=3, norm_topk_prob=False, topk_norm_rule="sigmoid_only",
                routed_scaling_factor=2.5)
    for scoring, expect_sum in (("sigmoid", True), ("softmax", False)):
        config = small_config(scoring_func=scoring, **base)
        weights = route(config, router_tensors(config, 4), hidden_states(config, 4)).weights
        assert np.allclose(weights.sum(axis=-1), 2.5, rtol=1e-14) == expect_sum


@PROPERTY
@given(grouped_configs(topk_method="noaux_tc", group_mask_fill="-inf"), st.integers(0, 2**16))
def test_bias_never_changes_the_weight_of_an_expert_chosen_both_ways(config, seed):
    tensors, hidden = router_tensors(config, seed), hidden_states(config, seed)
    unbiased = {**tensors, BIAS: np.zeros(config.n_routed_experts)}
    with_bias, without = route(config, tensors, hidden), route(config, unbiased, hidden)
    for t in range(len(hidden)):
        a = dict(zip(with_bias.expert_ids[t].tolist(), with_bias.weights[t].tolist()))
        b = dict(zip(without.expert_ids[t].tolist(), without.weights[t].tolist()))
        common = sorted(set(a) & set(b))
        if config.norm_topk_prob:  # renormalised: the unnormalised gate s_e is what must not move
            ratios_a = [a[e] / a[common[0]] for e in common]
            ratios_b = [b[e] / b[common[0]] for e in common]
            np.testing.assert_allclose(ratios_a, ratios_b, rtol=1e-13)
        else:
            assert [a[e] for e in common] == [b[e] for e in common]


def test_bias_changes_selection_but_weights_stay_unbiased():
    config = small_config(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, scoring_func="sigmoid",
                          topk_method="noaux_tc", norm_topk_prob=False, routed_scaling_factor=2.5)
    tensors, hidden = router_tensors(config, 11), hidden_states(config, 11, tokens=5)
    plain = route(config, {**tensors, BIAS: np.zeros(8)}, hidden)
    loser = int(np.argmin(plain.scores[0]))
    pushed = np.zeros(8)
    pushed[loser] = 10.0
    biased = route(config, {**tensors, BIAS: pushed}, hidden)
    assert loser not in plain.expert_ids[0] and biased.expert_ids[0, 0] == loser
    assert biased.weights[0, 0] == 2.5 * plain.scores[0, loser]  # the unbiased score, not score + 10


# ---------------------------------------------------------------------------- exact ties

def test_expert_ties_go_to_the_lower_index():
    config = small_config(n_routed_experts=8, num_experts_per_tok=2)
    masked = np.array([[0.1, 0.7, 0.2, 0.7, 0.5, 0.7, 0.0, 0.3],
                       [0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4],
                       [0.0, 0.2, 0.9, 0.1, 0.9, 0.0, 0.0, 0.9]])
    ids, margin = expert_selection(config, masked)
    assert ids.tolist() == [[1, 3], [0, 1], [2, 4]]
    assert margin.tolist() == [0.0, 0.0, 0.0]


def test_group_ties_go_to_the_lower_group_and_a_duplicated_max_counts_twice():
    config = small_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2, group_score_rule="top2_sum")
    selection = np.array([[0.1, 0.2, 0.5, 0.5, 0.3, 0.2, 0.6, 0.4],    # groups 0.3, 1.0, 0.5, 1.0: tie, group 1 wins
                          [0.5, 0.5, 0.5, 0.45, 0.0, 0.0, 0.0, 0.0]])  # duplicated max: 1.0 beats 0.95
    scores_of_groups = group_scores(config, selection)
    np.testing.assert_array_equal(scores_of_groups, [[0.1 + 0.2, 0.5 + 0.5, 0.3 + 0.2, 0.6 + 0.4], [1.0, 0.95, 0.0, 0.0]])
    kept, margin = group_selection(config, scores_of_groups)
    assert kept.tolist() == [[1], [0]]
    assert margin[0] == 0.0 and margin[1] == pytest.approx(0.05)
    with_max = config.replace(group_score_rule="max")
    assert group_selection(with_max, group_scores(with_max, selection))[0].tolist() == [[3], [0]]


def test_one_expert_per_group_scores_the_expert():
    config = small_config(n_routed_experts=4, n_group=4, topk_group=2, num_experts_per_tok=2, group_score_rule="top2_sum")
    selection = np.array([[0.3, 0.9, 0.3, 0.1]])
    np.testing.assert_array_equal(group_scores(config, selection), selection)
    kept, _ = group_selection(config, group_scores(config, selection))
    assert kept.tolist() == [[1, 0]]
    ids, _ = expert_selection(config, group_mask(config, selection, kept))
    assert ids.tolist() == [[1, 0]]


def test_ties_through_the_whole_router():
    """Identical gate rows give bit-identical scores: the lower expert and group index must win."""
    config = small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, scoring_func="sigmoid",
                          topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5)
    gate = np.zeros((8, 6))
    row = np.array([0.5, -0.25, 0.75, 0.0, 0.125, 0.5])
    for expert in (2, 3, 6, 7):  # groups 1 and 3 tie exactly (top-2 sums equal), experts tie inside them
        gate[expert] = row
    hidden = np.ones((2, 6))
    routing = route(config, {"mlp.gate.weight": gate, BIAS: np.zeros(8)}, hidden)
    assert routing.kept_groups.tolist() == [[1, 3], [1, 3]]
    assert routing.expert_ids.tolist() == [[2, 3, 6], [2, 3, 6]]
    assert routing.expert_margin.tolist() == [0.0, 0.0]
    np.testing.assert_allclose(routing.weights, 2.5 / 3)


# ---------------------------------------------------------------------------- group fill

def test_zero_fill_lets_a_dropped_group_win_with_negative_biases():
    config = small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, scoring_func="sigmoid",
                          topk_method="noaux_tc", norm_topk_prob=True, group_mask_fill="-inf")
    zero = config.replace(group_mask_fill="zero")
    tensors = router_tensors(config, 5, bias_shift=-2.0)  # every biased score < 0
    hidden = hidden_states(config, 5, tokens=20)
    per_group = 2
    inf_routing, zero_routing = route(config, tensors, hidden), route(zero, tensors, hidden)
    escaped = 0
    for kept, inf_ids, zero_ids in zip(inf_routing.kept_groups, inf_routing.expert_ids, zero_routing.expert_ids):
        assert set((inf_ids // per_group).tolist()) <= set(kept.tolist())
        escaped += not set((zero_ids // per_group).tolist()) <= set(kept.tolist())
    assert escaped == len(hidden)  # 0.0 beats every negative kept score
    np.testing.assert_array_equal(inf_routing.kept_groups, zero_routing.kept_groups)


def test_fills_agree_when_kept_scores_are_positive():
    config = small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, scoring_func="sigmoid",
                          topk_method="noaux_tc", norm_topk_prob=True)
    tensors, hidden = router_tensors(config, 8, bias_shift=2.0), hidden_states(config, 8, tokens=20)
    a, b = route(config, tensors, hidden), route(config.replace(group_mask_fill="zero"), tensors, hidden)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.weights, b.weights)


def test_weights_gather_the_given_ids():
    config = small_config(n_routed_experts=4, num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=16.0)
    scores = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_array_equal(routing_weights(config, scores, np.array([[3, 0]])), [[6.4, 1.6]])


# ---------------------------------------------------------------------------- layer kinds

def test_dense_and_moe_layers_follow_is_moe_layer():
    config = small_config(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2, n_shared_experts=1)
    hidden = hidden_states(config, 0, tokens=3)
    for layer in range(4):
        tensors = subtree(generate_weights(config, 0, shapes=layer_weight_shapes(config, layer)), f"model.layers.{layer}.")
        result = ffn_forward(config, tensors, hidden, layer)
        assert (result.routing is not None) == (layer in (2,))
        assert result.output.shape == hidden.shape


def test_shared_experts_are_added_unweighted():
    config = small_config(n_shared_experts=2, routed_scaling_factor=2.5, scoring_func="sigmoid", norm_topk_prob=True)
    tensors = subtree(generate_weights(config, 1, shapes=layer_weight_shapes(config, 1)), "model.layers.1.")
    hidden = hidden_states(config, 1, tokens=4)
    with_shared = ffn_forward(config, tensors, hidden, 1).output
    without = ffn_forward(config.replace(n_shared_experts=0),
                          {k: v for k, v in tensors.items() if "shared_experts" not in k}, hidden, 1).output
    gate, up, down = (tensors[f"mlp.shared_experts.{p}_proj.weight"] for p in ("gate", "up", "down"))
    assert gate.shape == (2 * config.moe_intermediate_size, config.hidden_size)
    pre = hidden @ gate.T
    shared = (pre / (1 + np.exp(-pre)) * (hidden @ up.T)) @ down.T
    np.testing.assert_allclose(with_shared - without, shared, rtol=1e-12, atol=1e-13)


def test_leading_axes_are_flattened_and_restored():
    config = small_config()
    tensors = subtree(generate_weights(config, 2, shapes=layer_weight_shapes(config, 1)), "model.layers.1.")
    hidden = np.random.default_rng(2).standard_normal((2, 3, config.hidden_size))
    nested = ffn_forward(config, tensors, hidden, 1)
    flat = ffn_forward(config, tensors, hidden.reshape(6, -1), 1)
    assert nested.output.shape == (2, 3, config.hidden_size) and nested.routing.expert_ids.shape == (6, 2)
    np.testing.assert_array_equal(nested.output.reshape(6, -1), flat.output)


def test_zero_tokens():
    config = small_config(n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid")
    tensors = subtree(generate_weights(config, 2, shapes=layer_weight_shapes(config, 1)), "model.layers.1.")
    result = ffn_forward(config, tensors, np.zeros((0, config.hidden_size)), 1)
    assert result.output.shape == (0, config.hidden_size) and result.routing.expert_ids.shape == (0, 2)


def test_float32_follows_float64():
    config = small_config(n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    tensors = subtree(generate_weights(config, 2, shapes=layer_weight_shapes(config, 1)), "model.layers.1.")
    hidden = hidden_states(config, 2, tokens=5)
    wide, narrow = ffn_forward(config, tensors, hidden, 1), ffn_forward(config, tensors, hidden, 1, dtype=np.float32)
    assert narrow.output.dtype == np.float32 and narrow.routing.weights.dtype == np.float32
    np.testing.assert_array_equal(narrow.routing.expert_ids, wide.routing.expert_ids)
    np.testing.assert_allclose(narrow.output, wide.output, rtol=1e-4, atol=1e-5)
