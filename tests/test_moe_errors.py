"""Bad input to the MoE layer: each rejected case raises the typed error naming the field and the spec id."""

from __future__ import annotations

import numpy as np
import pytest

from independent_moe import small_config
from mla_ref.balance import bias_update, sequence_balance_loss, v2_balance_losses
from mla_ref.dispatch import dispatch_plan
from mla_ref.errors import ConfigError, InputError, ShapeError, WeightError
from mla_ref.moe import ffn_forward, moe_weight_names, needed_expert_weight_names, route
from mla_ref.weights import generate_weights, layer_weight_shapes, subtree

BIAS = "mlp.gate.e_score_correction_bias"
V3_STYLE = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, scoring_func="sigmoid",
                topk_method="noaux_tc", norm_topk_prob=True, n_shared_experts=1)


def raises(error_type, what, spec_id):
    """Context manager: the error, its field and its spec id (also in the message)."""
    class Check:
        def __enter__(self):
            self.context = pytest.raises(error_type)
            self.info = self.context.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.context.__exit__(*exc)
            assert self.info.value.what == what, str(self.info.value)
            assert self.info.value.spec_id == spec_id, str(self.info.value)
            assert f"({spec_id})" in str(self.info.value)
            return handled
    return Check()


def layer_tensors(config, layer=1, seed=0):
    return subtree(generate_weights(config, seed, shapes=layer_weight_shapes(config, layer)), f"model.layers.{layer}.")


# ---------------------------------------------------------------------------- config rules (checked when the config is built)

def test_more_experts_per_token_than_the_kept_groups_hold():
    with raises(ConfigError, "num_experts_per_tok", "CONFIG.R3"):
        small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=5)
    small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4)


def test_experts_not_divisible_by_groups():
    with raises(ConfigError, "n_routed_experts", "CONFIG.R1"):
        small_config(n_routed_experts=10, n_group=4, topk_group=2)


def test_more_kept_groups_than_groups():
    with raises(ConfigError, "topk_group", "CONFIG.R2"):
        small_config(n_routed_experts=8, n_group=2, topk_group=3)


@pytest.mark.parametrize("field, value", [("scoring_func", "tanh"), ("group_score_rule", "mean"), ("topk_method", "topk"),
                                          ("group_mask_fill", "nan"), ("topk_norm_rule", "always")])
def test_unknown_rules(field, value):
    with raises(ConfigError, field, f"CONFIG.{field}"):
        small_config(**{field: value})


def test_group_score_rule_is_derived_from_the_bias():
    assert small_config(topk_method="noaux_tc").group_rule == "top2_sum"
    assert small_config(topk_method="group_limited_greedy").group_rule == "max"
    assert small_config(topk_method="noaux_tc", group_score_rule="max").group_rule == "max"
    assert small_config(topk_method="noaux_tc").replace(topk_method="group_limited_greedy").group_rule == "max"


# ---------------------------------------------------------------------------- router tensors

def test_bias_of_wrong_shape():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    with raises(WeightError, BIAS, "MOE.3"):
        route(config, {**tensors, BIAS: np.zeros(7)}, np.ones((2, 6)))
    with raises(WeightError, BIAS, "MOE.3"):
        route(config, {**tensors, BIAS: np.zeros((1, 8))}, np.ones((2, 6)))
    with raises(WeightError, BIAS, "MOE.15"):
        bias_update(config, np.zeros(9), np.ones(8))


def test_bias_missing_non_finite_or_unexpected():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    with raises(WeightError, BIAS, "MOE.3"):
        route(config, {k: v for k, v in tensors.items() if k != BIAS}, np.ones((2, 6)))
    broken = tensors[BIAS].copy()
    broken[3] = np.inf
    with raises(WeightError, BIAS, "MOE.3"):
        route(config, {**tensors, BIAS: broken}, np.ones((2, 6)))
    v2 = config.replace(topk_method="group_limited_greedy", scoring_func="softmax")
    with raises(WeightError, BIAS, "MOE.3"):
        route(v2, tensors, np.ones((2, 6)))
    with raises(WeightError, BIAS, "MOE.3"):
        ffn_forward(v2, tensors, np.ones((2, 6)), 1)


def test_gate_of_wrong_shape_or_missing():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    with raises(WeightError, "mlp.gate.weight", "MOE.1"):
        route(config, {**tensors, "mlp.gate.weight": np.zeros((6, 8))}, np.ones((2, 6)))
    with raises(WeightError, "mlp.gate.weight", "MOE.1"):
        route(config, {BIAS: tensors[BIAS]}, np.ones((2, 6)))


# ---------------------------------------------------------------------------- hidden and scores

def test_nan_hidden():
    config = small_config(**V3_STYLE)
    hidden = np.ones((3, 6))
    hidden[1, 2] = np.nan
    with raises(InputError, "hidden", "MOE.1"):
        route(config, layer_tensors(config), hidden)


def test_nan_rows_stay_in_their_row_when_allowed():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    hidden = np.random.default_rng(0).standard_normal((3, 6))
    clean = ffn_forward(config, tensors, hidden, 1).output
    hidden[1, 2] = np.nan
    poisoned = ffn_forward(config, tensors, hidden, 1, allow_nonfinite=True).output
    np.testing.assert_allclose(poisoned[[0, 2]], clean[[0, 2]], rtol=1e-12, atol=1e-15)
    assert np.isnan(poisoned[1]).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow is the point
def test_nan_scores_from_overflowing_logits():
    config = small_config(n_routed_experts=8, num_experts_per_tok=2, scoring_func="softmax")
    gate = np.ones((8, 6))  # every logit overflows to +inf: inf - inf in the softmax
    with raises(InputError, "scores", "MOE.2"):
        route(config, {"mlp.gate.weight": gate}, np.full((2, 6), 1e308))
    assert np.isnan(route(config, {"mlp.gate.weight": gate}, np.full((2, 6), 1e308), allow_nonfinite=True).scores).all()


def test_hidden_of_wrong_width():
    config = small_config(**V3_STYLE)
    with raises(ShapeError, "hidden", "MOE.1"):
        route(config, layer_tensors(config), np.ones((2, 7)))


def test_bad_dtype_request():
    config = small_config(**V3_STYLE)
    with raises(InputError, "dtype", "MOE.1"):
        route(config, layer_tensors(config), np.ones((2, 6)), dtype=np.float16)


# ---------------------------------------------------------------------------- experts and layers

def test_missing_expert_names_the_first_missing_tensor():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    hidden = np.random.default_rng(1).standard_normal((4, 6))
    needed = sorted(set(route(config, tensors, hidden).expert_ids.ravel().tolist()))
    partial = {k: v for k, v in tensors.items() if not k.startswith(f"mlp.experts.{needed[1]}.")}
    with raises(WeightError, f"mlp.experts.{needed[1]}.gate_proj.weight", "MOE.9"):
        ffn_forward(config, partial, hidden, 1)


def test_only_the_needed_experts_are_required():
    config = small_config(**V3_STYLE)
    hidden = np.random.default_rng(1).standard_normal((2, 6))
    shapes = layer_weight_shapes(config, 1)
    router = subtree(generate_weights(config, 0, names=moe_weight_names(config, 1, expert_ids=[]), shapes=shapes), "model.layers.1.")
    assert sorted(router) == ["mlp.gate.e_score_correction_bias", "mlp.gate.weight", "mlp.shared_experts.down_proj.weight",
                              "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"]
    ids = route(config, router, hidden).expert_ids
    names = needed_expert_weight_names(config, 1, ids)
    assert len(names) == 3 * len(np.unique(ids)) and all(name.startswith("model.layers.1.mlp.experts.") for name in names)
    experts = subtree(generate_weights(config, 0, names=names, shapes=shapes), "model.layers.1.")
    partial = ffn_forward(config, {**router, **experts}, hidden, 1).output
    np.testing.assert_array_equal(partial, ffn_forward(config, layer_tensors(config), hidden, 1).output)


def test_expert_of_wrong_shape():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    hidden = np.random.default_rng(1).standard_normal((1, 6))
    expert = int(route(config, tensors, hidden).expert_ids[0, 0])
    name = f"mlp.experts.{expert}.down_proj.weight"
    with raises(WeightError, name, "MOE.9"):
        ffn_forward(config, {**tensors, name: tensors[name].T}, hidden, 1)


def test_unexpected_tensors():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    with raises(WeightError, "mlp.experts.8.up_proj.weight", "MOE.9"):
        ffn_forward(config, {**tensors, "mlp.experts.8.up_proj.weight": np.zeros((3, 6))}, np.ones((1, 6)), 1)
    with raises(WeightError, "mlp.gate.weight", "MOE.13"):
        ffn_forward(config, {**layer_tensors(config, 0), "mlp.gate.weight": tensors["mlp.gate.weight"]}, np.ones((1, 6)), 0)
    no_shared = config.replace(n_shared_experts=0)
    with raises(WeightError, "mlp.shared_experts.gate_proj.weight", "MOE.9"):
        ffn_forward(no_shared, tensors, np.ones((1, 6)), 1)
    ffn_forward(config, {**tensors, "self_attn.o_proj.weight": np.zeros(1)}, np.ones((1, 6)), 1)  # other tensors are ignored


def test_missing_shared_or_dense_tensor():
    config = small_config(**V3_STYLE)
    tensors = layer_tensors(config)
    with raises(WeightError, "mlp.shared_experts.up_proj.weight", "MOE.11"):
        ffn_forward(config, {k: v for k, v in tensors.items() if k != "mlp.shared_experts.up_proj.weight"}, np.ones((1, 6)), 1)
    dense = layer_tensors(config, 0)
    with raises(WeightError, "mlp.down_proj.weight", "MOE.13"):
        ffn_forward(config, {k: v for k, v in dense.items() if k != "mlp.down_proj.weight"}, np.ones((1, 6)), 0)


def test_bad_layer():
    config = small_config(**V3_STYLE)
    for layer in (-1, 2, 1.0, True):
        with raises(InputError, "layer", "MOE.13"):
            ffn_forward(config, layer_tensors(config), np.ones((1, 6)), layer)
    with raises(InputError, "layer", "MOE.13"):
        needed_expert_weight_names(config, 0, [1, 2])


# ---------------------------------------------------------------------------- training and dispatch

def test_ranks_not_dividing_the_experts():
    config = small_config(**V3_STYLE)
    ids = np.array([[0, 1, 2]])
    for ranks in (3, 0, 16, 2.0):
        with raises(InputError, "ranks", "MOE.18"):
            dispatch_plan(config, ids, ranks)


def test_bad_expert_ids():
    config = small_config(**V3_STYLE)
    with raises(ShapeError, "expert_ids", "MOE.18"):
        dispatch_plan(config, np.array([[0, 1]]), 2)
    with raises(InputError, "expert_ids", "MOE.18"):
        dispatch_plan(config, np.array([[0, 1, 8]]), 2)
    with raises(InputError, "expert_ids", "MOE.18"):
        dispatch_plan(config, np.array([[0, 1, 1]]), 2)
    with raises(ShapeError, "expert_ids", "MOE.18"):
        dispatch_plan(config, np.array([[0.0, 1.0, 2.0]]), 2)


def test_training_rule_arguments():
    config = small_config(**V3_STYLE)
    scores = np.full((1, 2, 8), 0.5)
    ids = np.array([[[0, 1, 2], [3, 4, 5]]])
    with raises(ConfigError, "topk_method", "MOE.15"):
        bias_update(config.replace(topk_method="greedy", scoring_func="softmax"), np.zeros(8), np.ones(8))
    with raises(ShapeError, "load", "MOE.15"):
        bias_update(config, np.zeros(8), np.ones(7))
    with raises(InputError, "indicator", "MOE.16"):
        sequence_balance_loss(config, scores, indicator="biased")
    with raises(InputError, "expert_ids", "MOE.16"):
        sequence_balance_loss(config, scores, indicator="routed")
    with raises(InputError, "scores", "MOE.16"):
        sequence_balance_loss(config, np.zeros((1, 0, 8)))
    with raises(InputError, "devices", "MOE.17"):
        v2_balance_losses(config, scores, ids, devices=3)
    with raises(InputError, "max_devices", "MOE.17"):
        v2_balance_losses(config, scores, ids, devices=2, max_devices=3)
    with raises(ShapeError, "expert_ids", "MOE.17"):
        v2_balance_losses(config, scores, ids[:, :1], devices=2)
