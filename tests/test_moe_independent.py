"""The vectorised router and MoE layer against the independent per-token reading (tests/independent_moe.py).

Routing is compared in two parts so that the comparison of ids can be exact:
- logits and scores (MOE.1-MOE.2) to 1e-12, each side computing its own;
- everything after (MOE.3-MOE.8) exactly for ids, kept groups and margins, to 1e-12 for the
  weights, the independent side starting from the reference's scores. Two different exp /
  sum implementations may round a mathematically exact tie (e.g. s(a) + s(-a) = 1 in a top-2
  group sum) apart by one ulp: that is a genuinely ambiguous token, not a disagreement.
Inputs are dyadic (small multiples of 1/4, 1/16) so that exact ties are frequent.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import independent_moe as ind
from mla_ref.config import load_preset
from mla_ref.moe import ffn_forward, route
from mla_ref.trace import Trace
from mla_ref.weights import generate_weights, layer_weight_shapes, subtree

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def moe_configs(draw):
    """V2- and V3-style routing rules over small expert counts."""
    n_group = draw(st.integers(1, 4))
    per_group = draw(st.integers(1, 4))
    topk_group = draw(st.integers(1, n_group))
    return ind.small_config(
        hidden_size=draw(st.integers(1, 6)),
        n_routed_experts=n_group * per_group,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=draw(st.integers(1, topk_group * per_group)),
        n_shared_experts=draw(st.integers(0, 2)),
        moe_intermediate_size=draw(st.integers(1, 4)),
        scoring_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        topk_method=draw(st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"])),
        group_score_rule=draw(st.sampled_from([None, "max", "top2_sum"])),
        group_mask_fill=draw(st.sampled_from(["-inf", "zero"])),
        topk_norm_rule=draw(st.sampled_from(["norm_topk_prob", "sigmoid_only"])),
        norm_topk_prob=draw(st.booleans()),
        topk_norm_epsilon=draw(st.sampled_from([0.0, 1e-20])),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0, 2.827])),
    )


def dyadic(shape, bound, denominator):
    return arrays(np.int64, shape, elements=st.integers(-bound, bound)).map(lambda a: a / denominator)


@st.composite
def routing_cases(draw):
    config = draw(moe_configs())
    tokens = draw(st.integers(1, 5))
    gate = draw(dyadic((config.n_routed_experts, config.hidden_size), 2, 4))
    hidden = draw(dyadic((tokens, config.hidden_size), 2, 4))
    weights = {"mlp.gate.weight": gate}
    if config.has_correction_bias:
        weights["mlp.gate.e_score_correction_bias"] = draw(dyadic((config.n_routed_experts,), 24, 16))
    return config, weights, hidden


def check_routing(config, weights, hidden, routing):
    bias = weights.get("mlp.gate.e_score_correction_bias")
    for t, x in enumerate(hidden):
        own = ind.route_token(config, weights["mlp.gate.weight"], bias, x)
        np.testing.assert_allclose(routing.logits[t], own["logits"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(routing.scores[t], own["scores"], rtol=1e-12, atol=1e-15)
        chosen = ind.select_token(config, routing.scores[t], bias)
        assert routing.expert_ids[t].tolist() == chosen["ids"], f"token {t}"
        assert routing.kept_groups[t].tolist() == chosen["kept_groups"], f"token {t}"
        np.testing.assert_array_equal(routing.group_scores[t], chosen["group_scores"])
        np.testing.assert_array_equal(routing.masked[t], chosen["masked"])
        assert routing.group_margin[t] == chosen["group_margin"]
        assert routing.expert_margin[t] == chosen["expert_margin"]
        np.testing.assert_allclose(routing.weights[t], chosen["weights"], rtol=1e-12, atol=1e-300)


@FAST
@given(routing_cases())
def test_router_equals_per_token_reading(case):
    config, weights, hidden = case
    check_routing(config, weights, hidden, route(config, weights, hidden))


@LAYER
@given(routing_cases(), st.integers(0, 2**16))
def test_layer_equals_per_token_reading(case, seed):
    config, router, hidden = case
    layer = 1
    tensors = subtree(generate_weights(config, seed, shapes=layer_weight_shapes(config, layer)), f"model.layers.{layer}.")
    tensors.update(router)
    result = ffn_forward(config, tensors, hidden, layer)
    check_routing(config, router, hidden, result.routing)
    for t, x in enumerate(hidden):
        chosen = ind.select_token(config, result.routing.scores[t], router.get("mlp.gate.e_score_correction_bias"))
        expected = ind.layer_token(config, tensors, x, chosen["ids"], chosen["weights"], moe=True)
        np.testing.assert_allclose(result.output[t], expected, rtol=1e-12, atol=1e-12)


@LAYER
@given(moe_configs(), st.integers(0, 2**16), st.integers(1, 4))
def test_dense_layer_equals_per_token_reading(config, seed, tokens):
    tensors = subtree(generate_weights(config, seed, shapes=layer_weight_shapes(config, 0)), "model.layers.0.")
    hidden = np.random.default_rng(seed).standard_normal((tokens, config.hidden_size))
    result = ffn_forward(config, tensors, hidden, 0)
    assert result.routing is None
    for t, x in enumerate(hidden):
        np.testing.assert_allclose(result.output[t], ind.layer_token(config, tensors, x, [], [], moe=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2", "tiny-v2lite", "tiny-mscale-mismatch"])
def test_presets_end_to_end_with_continuous_inputs(preset):
    """Generator weights and normal hidden states: no near ties, so the whole per-token pipeline must give the same ids."""
    config = load_preset(preset)
    layer = config.moe_layers[0]
    tensors = subtree(generate_weights(config, 7, shapes=layer_weight_shapes(config, layer)), f"model.layers.{layer}.")
    hidden = np.random.default_rng(3).standard_normal((2, 9, config.hidden_size))
    trace = Trace()
    result = ffn_forward(config, tensors, hidden, layer, trace=trace)
    assert result.output.shape == hidden.shape
    bias = tensors.get("mlp.gate.e_score_correction_bias")
    flat = hidden.reshape(-1, config.hidden_size)
    for t, x in enumerate(flat):
        own = ind.route_token(config, tensors["mlp.gate.weight"], bias, x)
        assert min(own["group_margin"], own["expert_margin"]) > 1e-9
        assert result.routing.expert_ids[t].tolist() == own["ids"]
        np.testing.assert_allclose(result.routing.weights[t], own["weights"], rtol=1e-12)
        expected = ind.layer_token(config, tensors, x, own["ids"], own["weights"], moe=True)
        np.testing.assert_allclose(result.output.reshape(-1, config.hidden_size)[t], expected, rtol=1e-12, atol=1e-12)
