"""Training-side rules (MOE.14-MOE.17) and the expert-parallel dispatch plan (MOE.18)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import independent_moe as ind
from mla_ref.balance import bias_update, expert_load, sequence_balance_loss, v2_balance_losses
from mla_ref.dispatch import dispatch_plan
from mla_ref.errors import InputError
from mla_ref.moe import route

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIAS = "mlp.gate.e_score_correction_bias"


@st.composite
def routed_batches(draw, topk_method=None):
    """A config, a routing of batch x seq tokens, and the scores behind it."""
    n_group = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 4))
    topk_group = draw(st.integers(1, n_group))
    config = ind.small_config(
        n_routed_experts=n_group * per_group, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=draw(st.integers(1, topk_group * per_group)),
        scoring_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        topk_method=topk_method or draw(st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"])))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tensors = {"mlp.gate.weight": rng.standard_normal((config.n_routed_experts, config.hidden_size))}
    if config.has_correction_bias:
        tensors[BIAS] = 0.3 * rng.standard_normal(config.n_routed_experts)
    routing = route(config, tensors, rng.standard_normal((batch, seq, config.hidden_size)))
    return config, tensors, routing, batch, seq


# ---------------------------------------------------------------------------- load and bias update

@PROPERTY
@given(routed_batches(topk_method="noaux_tc"), st.sampled_from([0.001, 0.25]))
def test_load_and_bias_update_follow_the_per_expert_reading(case, gamma):
    config, tensors, routing, _, _ = case
    load = expert_load(config, routing.expert_ids)
    assert load.tolist() == ind.load_counts(config, routing.expert_ids)
    assert load.sum() == routing.expert_ids.size
    new_bias = bias_update(config, tensors[BIAS], load, speed=gamma)
    np.testing.assert_array_equal(new_bias, ind.updated_bias(config, tensors[BIAS], load, gamma))
    mean = load.mean()
    moved = new_bias - tensors[BIAS]
    assert np.all(moved[load > mean] < 0) and np.all(moved[load < mean] > 0) and np.all(moved[load == mean] == 0)
    hidden = np.random.default_rng(len(load)).standard_normal((len(routing.expert_ids), config.hidden_size))
    rerouted = route(config, {**tensors, BIAS: new_bias}, hidden)
    assert expert_load(config, rerouted.expert_ids).mean() == mean  # every token still takes K experts


def test_bias_update_directions_on_crafted_loads():
    config = ind.small_config(n_routed_experts=4, num_experts_per_tok=1, topk_method="noaux_tc", scoring_func="sigmoid",
                              bias_update_speed=0.001)
    bias = np.array([0.5, -0.5, 2.0, 0.0])
    np.testing.assert_array_equal(bias_update(config, bias, [5, 1, 3, 3]), bias + [-0.001, 0.001, 0.0, 0.0])
    np.testing.assert_array_equal(bias_update(config, bias, [2, 2, 2, 2]), bias)
    np.testing.assert_array_equal(bias_update(config, bias, [1, 1, 1, 2]), bias + [0.001, 0.001, 0.001, -0.001])
    np.testing.assert_array_equal(bias_update(config.replace(bias_update_speed=0.0), bias, [9, 0, 0, 0]), bias)


# ---------------------------------------------------------------------------- balance losses

@PROPERTY
@given(routed_batches(), st.sampled_from(["unbiased_topk", "routed"]))
def test_sequence_loss_follows_the_per_sequence_reading(case, indicator):
    config, _, routing, batch, seq = case
    scores = routing.scores.reshape(batch, seq, -1)
    ids = routing.expert_ids.reshape(batch, seq, -1)
    result = sequence_balance_loss(config, scores, ids if indicator == "routed" else None, indicator=indicator, alpha=0.0001)
    expected = ind.sequence_loss(config, scores, ids, indicator, 0.0001)
    np.testing.assert_allclose(result.loss, expected, rtol=1e-12)
    np.testing.assert_allclose(result.f.sum(axis=-1), config.n_routed_experts, rtol=1e-12)  # f averages to 1
    np.testing.assert_allclose(result.p.sum(axis=-1), 1.0, rtol=1e-12)


def test_sequence_loss_indicators_differ_where_the_bias_changes_the_choice():
    config = ind.small_config(n_routed_experts=4, num_experts_per_tok=1, scoring_func="sigmoid", topk_method="noaux_tc",
                              aux_loss_alpha=0.5)
    scores = np.array([[[0.9, 0.1, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1]]])  # top-1 unbiased: expert 0 twice
    routed = np.array([[[1], [2]]])  # what a bias made routing choose
    unbiased = sequence_balance_loss(config, scores)
    chosen = sequence_balance_loss(config, scores, routed, indicator="routed")
    np.testing.assert_allclose(unbiased.f, [[4.0, 0, 0, 0]])
    np.testing.assert_allclose(chosen.f, [[0, 2.0, 2.0, 0]])
    np.testing.assert_allclose(unbiased.loss, [0.5 * 4.0 * 0.75])  # s' of expert 0 = 0.9 / 1.2
    np.testing.assert_allclose(chosen.loss, [0.5 * 2.0 * (1 / 12 + 1 / 12)])


def test_sequence_loss_top_k_ties_go_to_the_lower_index():
    config = ind.small_config(n_routed_experts=4, num_experts_per_tok=1, aux_loss_alpha=1.0)
    scores = np.array([[[0.1, 0.3, 0.3, 0.3], [0.2, 0.2, 0.1, 0.2]]])
    np.testing.assert_array_equal(sequence_balance_loss(config, scores).f, [[2.0, 2.0, 0.0, 0.0]])


def test_perfect_balance_gives_alpha():
    config = ind.small_config(n_routed_experts=4, num_experts_per_tok=2, aux_loss_alpha=0.25)
    scores = np.full((1, 2, 4), 0.25)
    ids = np.array([[[0, 1], [2, 3]]])
    np.testing.assert_allclose(sequence_balance_loss(config, scores, ids, indicator="routed").loss, [0.25])
    v2 = v2_balance_losses(config.replace(n_group=2, topk_group=2), scores, ids, alpha_expert=0.25, alpha_device=0.5, alpha_comm=1.0)
    np.testing.assert_allclose(v2.expert_loss, [0.25])
    np.testing.assert_allclose(v2.device_loss, [0.5 * (1.0 * 0.5 + 1.0 * 0.5)])
    np.testing.assert_allclose(v2.comm_loss, [1.0 * (2 / 4 * 1 * 0.5 + 2 / 4 * 1 * 0.5)])


@PROPERTY
@given(routed_batches(), st.data())
def test_v2_losses_follow_the_per_sequence_reading(case, data):
    config, _, routing, batch, seq = case
    devices = data.draw(st.sampled_from([d for d in range(1, config.n_routed_experts + 1) if config.n_routed_experts % d == 0]))
    max_devices = data.draw(st.integers(1, devices))
    scores = routing.scores.reshape(batch, seq, -1)
    ids = routing.expert_ids.reshape(batch, seq, -1)
    result = v2_balance_losses(config, scores, ids, devices=devices, max_devices=max_devices, alpha_expert=0.003)
    expected = np.array(ind.v2_losses(config, scores, ids, devices, max_devices, (0.003, 0.05, 0.02)))
    np.testing.assert_allclose(np.stack([result.expert_loss, result.device_loss, result.comm_loss], axis=-1), expected, rtol=1e-12)


def test_v2_loss_defaults_are_the_published_values():
    config = ind.small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, aux_loss_alpha=0.003)
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(8), size=(2, 5))
    ids = np.argsort(-scores, axis=-1, kind="stable")[..., :2]
    default = v2_balance_losses(config, scores, ids)
    explicit = v2_balance_losses(config, scores, ids, devices=4, max_devices=2, alpha_expert=0.003, alpha_device=0.05, alpha_comm=0.02)
    for name in ("expert_loss", "device_loss", "comm_loss"):
        np.testing.assert_array_equal(getattr(default, name), getattr(explicit, name))


# ---------------------------------------------------------------------------- dispatch plan

@PROPERTY
@given(routed_batches(), st.data())
def test_dispatch_plan_follows_the_per_rank_reading(case, data):
    config, _, routing, _, _ = case
    experts = config.n_routed_experts
    ranks = data.draw(st.sampled_from([r for r in range(1, experts + 1) if experts % r == 0]))
    plan = dispatch_plan(config, routing.expert_ids, ranks)
    expected_lists, expected_groups = ind.dispatch(config, routing.expert_ids, ranks)
    assert [rows.tolist() for rows in plan.per_rank] == [[list(triple) for triple in rows] for rows in expected_lists]
    assert plan.counts.tolist() == [len(rows) for rows in expected_lists]
    assert plan.counts.sum() == routing.expert_ids.size
    assert plan.groups_per_token.tolist() == expected_groups
    assert plan.groups_per_token.max() <= config.topk_group
    for rank, rows in enumerate(plan.per_rank):
        assert np.all(rows[:, 2] // plan.experts_per_rank == rank)
        assert np.all(routing.expert_ids[rows[:, 0], rows[:, 1]] == rows[:, 2])


def test_dispatch_plan_order_on_a_crafted_routing():
    config = ind.small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    ids = np.array([[5, 1], [0, 1], [4, 5]])
    plan = dispatch_plan(config, ids, ranks=4)
    assert plan.for_rank(0).tolist() == [[1, 0, 0], [0, 1, 1], [1, 1, 1]]  # expert 0 first, then expert 1 by token
    assert plan.for_rank(1).tolist() == []
    assert plan.for_rank(2).tolist() == [[2, 0, 4], [0, 0, 5], [2, 1, 5]]
    assert plan.counts.tolist() == [3, 0, 3, 0]
    assert plan.groups_per_token.tolist() == [2, 1, 1]


def test_dispatch_rejects_a_token_beyond_the_node_limit():
    config = ind.small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    ids = np.array([[0, 2, 4], [0, 1, 2]])
    with pytest.raises(InputError) as error:
        dispatch_plan(config, ids, ranks=2)
    assert error.value.what == "expert_ids" and error.value.spec_id == "MOE.18" and "token 0 reaches 3 groups" in str(error.value)
    assert dispatch_plan(config, ids, ranks=2, enforce_node_limit=False).groups_per_token.tolist() == [3, 2]


def test_zero_fill_routing_can_break_the_node_limit():
    config = ind.small_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2, scoring_func="sigmoid",
                              topk_method="noaux_tc", norm_topk_prob=True, group_mask_fill="zero")
    gate = np.zeros((8, 6))
    bias = np.array([0.0, -1.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0])  # kept group 0: selection 0.5 and -0.5
    routing = route(config, {"mlp.gate.weight": gate, BIAS: bias}, np.zeros((1, 6)))
    assert routing.kept_groups.tolist() == [[0]] and routing.expert_ids.tolist() == [[0, 2]]  # 0.0 fill of group 1 beats -0.5
    with pytest.raises(InputError):
        dispatch_plan(config, routing.expert_ids, ranks=4)
    assert route(config.replace(group_mask_fill="-inf"), {"mlp.gate.weight": gate, BIAS: bias}, np.zeros((1, 6))).expert_ids.tolist() == [[0, 1]]
