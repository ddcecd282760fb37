"""The fp8 precision profile (spec/tolerance.yaml fp8, FP8.13): which layers its emulation runs through FP8.8, what
stays bf16, and that the truth of an FP8 checkpoint is the float64 model on its dequantised weights."""

from __future__ import annotations

import numpy as np
import pytest

from mla_ref import generate_attention_weights, generate_weights, load_preset, mla_forward
from mla_ref.errors import ShapeError
from mla_ref.fp8 import fp8_linear
from mla_ref.moe import ffn_forward
from mla_ref.precision import round_bf16
from mla_ref.trace import Trace, profile
from mla_ref.weights import dequantize_checkpoint, subtree, weight_shapes

CONFIG = load_preset("tiny-fp8")


@pytest.fixture(scope="module")
def attention():
    weights = generate_attention_weights(CONFIG, seed=2, fp8=True)
    hidden = np.random.default_rng(0).standard_normal((2, 3, CONFIG.hidden_size))
    return weights, hidden


@pytest.fixture(scope="module")
def moe_layer():
    layer = 1
    names = [name for name in weight_shapes(CONFIG) if name.startswith(f"model.layers.{layer}.mlp.")]
    weights = subtree(generate_weights(CONFIG, seed=2, names=names, fp8=True), f"model.layers.{layer}.")
    hidden = np.random.default_rng(1).standard_normal((5, CONFIG.hidden_size))
    return weights, hidden, layer


def test_the_truth_of_an_fp8_checkpoint_is_the_model_on_its_dequantised_weights(attention, moe_layer):
    weights, hidden = attention
    assert np.array_equal(mla_forward(CONFIG, weights, hidden).output, mla_forward(CONFIG, dequantize_checkpoint(weights), hidden).output)
    weights, hidden, layer = moe_layer
    assert np.array_equal(ffn_forward(CONFIG, weights, hidden, layer).output, ffn_forward(CONFIG, dequantize_checkpoint(weights), hidden, layer).output)


def test_the_emulation_runs_kv_a_proj_through_the_fp8_gemm(attention):
    """MLA.3's k_pe (not normalised) is exactly bf16 of FP8.8 on the bf16 hidden state and the checkpoint's codes and scales."""
    weights, hidden = attention
    trace = Trace("fp8")
    mla_forward(CONFIG, weights, hidden, trace=trace)
    options = profile("fp8")["fp8_linear"]
    kv_a = fp8_linear(round_bf16(hidden), weights["kv_a_proj_with_mqa.weight"], weights["kv_a_proj_with_mqa.weight_scale_inv"],
                      options["gemm_impl"], options["scale_fmt"], options["act_quant"])  # [batch, seq, kv_lora_rank + rope]
    assert np.array_equal(trace["MLA.3"]["k_pe_raw"], kv_a[..., CONFIG.kv_lora_rank:])
    bf16 = Trace("bf16")
    mla_forward(CONFIG, dequantize_checkpoint(weights), hidden, trace=bf16)
    assert not np.array_equal(trace["MLA.3"]["k_pe_raw"], bf16["MLA.3"]["k_pe_raw"])  # activations quantised: not the bf16 run


def test_the_router_gate_stays_bf16_and_the_experts_go_fp8(moe_layer):
    weights, hidden, layer = moe_layer
    fp8, bf16 = Trace("fp8"), Trace("bf16")
    ffn_forward(CONFIG, weights, hidden, layer, trace=fp8)
    ffn_forward(CONFIG, dequantize_checkpoint(weights), hidden, layer, trace=bf16)
    assert np.array_equal(fp8["MOE.1"]["logits"], bf16["MOE.1"]["logits"])  # the gate is kept unquantised (spec/fp8.yaml kept)
    assert np.array_equal(fp8["MOE.7"]["expert_ids"], bf16["MOE.7"]["expert_ids"])
    assert not np.array_equal(fp8["MOE.11"]["shared"], bf16["MOE.11"]["shared"])  # the shared expert is an FP8 layer


def test_the_gemm_variant_of_the_profile_is_more_precise_than_the_fp8_one(attention):
    """Calibration variant fp8-bf16-gemm (no activation quantisation) lands closer to the truth than the profile's emulation."""
    weights, hidden = attention
    truth = mla_forward(CONFIG, weights, hidden).output
    errors = {name: np.linalg.norm(mla_forward(CONFIG, weights, hidden, trace=Trace(name, keep=False)).output - truth)
              for name in ("fp8", "fp8-bf16-gemm")}
    assert 0 < errors["fp8-bf16-gemm"] < errors["fp8"] / 3, errors


def test_an_fp8_contraction_not_a_multiple_of_128_is_a_shape_error():
    """FP8.6 quantises activations in 1 x 128 groups (as DeepSeek's act_quant asserts): the tiny preset's hidden size 64 cannot run."""
    config = load_preset("tiny")
    weights = generate_attention_weights(config, seed=0, fp8=True)
    with pytest.raises(ShapeError, match=r"x: expected \[\.\.\., N\] with N a positive multiple of 128.*FP8\.6"):
        mla_forward(config, weights, np.zeros((1, 2, config.hidden_size)), trace=Trace("fp8"))
