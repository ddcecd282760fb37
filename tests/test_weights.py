"""The deterministic weight generator: values depend only on (seed, name, shape); scaled for O(1) activations."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import hidden_states, preset
from mla_ref import mla_forward
from mla_ref.errors import WeightError
from mla_ref.weights import generate_attention_weights, generate_weights, layer_weight_shapes, subtree, tensor_seed, \
    weight_shapes


def test_a_tensor_depends_only_on_seed_name_and_shape():
    config = preset("tiny")
    full = generate_weights(config, seed=7)
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    alone = generate_weights(config, seed=7, names=[name])
    assert np.array_equal(alone[name], full[name])
    assert not np.array_equal(generate_weights(config, seed=8, names=[name])[name], full[name])
    bigger = config.replace(n_routed_experts=32, num_hidden_layers=3)  # the tensor keeps its name and shape
    assert np.array_equal(generate_weights(bigger, seed=7, names=[name])[name], full[name])


def test_attention_weights_equal_the_full_model_subtree():
    config = preset("tiny-v2lite")
    full = generate_weights(config, seed=3)
    relative = generate_attention_weights(config, seed=3, layer=1)
    expected = subtree(full, "model.layers.1.self_attn.")
    assert sorted(relative) == sorted(expected)
    assert all(np.array_equal(relative[k], expected[k]) for k in relative)
    assert "q_proj.weight" in relative and "q_a_proj.weight" not in relative


def test_seed_formula_is_the_documented_one():
    import hashlib
    key = "mla-ref-weights/v1/0/lm_head.weight/97,64"
    assert tensor_seed(0, "lm_head.weight", (97, 64)) == int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def test_layout_of_the_full_model():
    config = preset("tiny")  # 3 layers, first dense, 2 MTP modules
    shapes = weight_shapes(config)
    assert "model.layers.0.mlp.gate_proj.weight" in shapes and "model.layers.0.mlp.gate.weight" not in shapes
    assert shapes["model.layers.1.mlp.gate.weight"] == (16, 64)
    assert shapes["model.layers.1.mlp.gate.e_score_correction_bias"] == (16,)
    assert shapes["model.layers.1.mlp.shared_experts.gate_proj.weight"] == (20, 64)
    assert shapes["model.layers.4.eh_proj.weight"] == (64, 128)
    assert "model.layers.5.enorm.weight" not in shapes and "model.layers.2.enorm.weight" not in shapes
    no_bias = preset("tiny-v2")
    assert not any(name.endswith("e_score_correction_bias") for name in layer_weight_shapes(no_bias, 1))


def test_v3_checkpoint_shapes():
    shapes = layer_weight_shapes(preset("deepseek-v3"), 3)
    expected = {"self_attn.q_a_proj.weight": (1536, 7168), "self_attn.q_b_proj.weight": (24576, 1536),
                "self_attn.kv_a_proj_with_mqa.weight": (576, 7168), "self_attn.kv_b_proj.weight": (32768, 512),
                "self_attn.o_proj.weight": (7168, 16384), "mlp.gate.weight": (256, 7168),
                "mlp.experts.255.down_proj.weight": (7168, 2048)}
    for name, shape in expected.items():
        assert shapes["model.layers.3." + name] == shape, name
    assert layer_weight_shapes(preset("deepseek-v3"), 0)["model.layers.0.mlp.gate_proj.weight"] == (18432, 7168)


@pytest.mark.parametrize("name", ["tiny", "tiny-yarn", "tiny-v2lite", "tiny-v2"])
def test_activations_stay_order_one(name):
    config = preset(name)
    hidden = hidden_states(config, 2, 16)
    output = mla_forward(config, generate_attention_weights(config), hidden, [0, 2000]).output
    assert 0.1 < output.std() < 10


def test_unknown_tensor_name():
    with pytest.raises(WeightError, match=r"model.layers.9.self_attn.q_a_proj.weight: not a tensor of this config"):
        generate_weights(preset("tiny"), names=["model.layers.9.self_attn.q_a_proj.weight"])
