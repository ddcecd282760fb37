"""The FP8 checkpoint of the weight generator (spec/fp8.yaml ``checkpoint``): which tensors are FP8, their scale
grids and formats, how close the dequantised weights stay to the float64 ones, and the reader's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from mla_ref import generate_attention_weights, generate_weights, load_preset, mla_forward
from mla_ref.errors import WeightError
from mla_ref.fp8 import decode_fp8
from mla_ref.spec import load_spec_file, resolve_function
from mla_ref.weights import dequantize_checkpoint

CHECKPOINT = load_spec_file("fp8.yaml")["checkpoint"]


def is_power_of_two(values: np.ndarray) -> bool:
    mantissa, _ = np.frexp(values.astype(np.float64))
    return bool(np.all(mantissa == 0.5))


@pytest.fixture(scope="module")
def tiny_checkpoint():
    config = load_preset("tiny")
    return generate_weights(config, seed=3), generate_weights(config, seed=3, fp8=True)


def test_the_spec_names_the_writer_and_the_reader():
    assert resolve_function(CHECKPOINT["function"]) is generate_weights
    assert resolve_function(CHECKPOINT["reader"]) is dequantize_checkpoint


def test_linear_layers_become_codes_with_scales_and_the_rest_stays(tiny_checkpoint):
    plain, fp8 = tiny_checkpoint
    quantised = [name for name, value in fp8.items() if value.dtype == np.uint8]
    assert quantised and set(fp8) == set(plain) | {name + "_scale_inv" for name in quantised}
    for name in quantised:
        rows, columns = plain[name].shape
        assert fp8[name].shape == (rows, columns)
        assert fp8[name + "_scale_inv"].shape == (-(-rows // 128), -(-columns // 128))
        assert fp8[name + "_scale_inv"].dtype == np.float32
    for name, value in plain.items():
        if name not in quantised:
            assert np.array_equal(fp8[name], value), name
    kept = [name for name in plain if name.endswith(("lm_head.weight", "mlp.gate.weight", "eh_proj.weight"))]
    assert kept and not set(kept) & set(quantised)
    assert any(".mlp.experts." in name for name in quantised) and any(name.endswith("kv_b_proj.weight") for name in quantised)


def test_scales_are_powers_of_two_except_o_proj(tiny_checkpoint):
    _, fp8 = tiny_checkpoint
    scales = {name: value for name, value in fp8.items() if name.endswith("_scale_inv")}
    o_proj = {name: value for name, value in scales.items() if name.endswith("o_proj.weight_scale_inv")}
    assert o_proj and all(not is_power_of_two(value) for value in o_proj.values())
    assert all(is_power_of_two(value) for name, value in scales.items() if name not in o_proj)


def test_dequantised_weights_are_within_e4m3_rounding_of_the_float64_ones(tiny_checkpoint):
    plain, fp8 = tiny_checkpoint
    dequantised = dequantize_checkpoint(fp8)
    assert set(dequantised) == set(plain)
    for name, value in plain.items():
        if fp8[name].dtype != np.uint8:
            assert dequantised[name] is fp8[name]
            continue
        scale = fp8[name + "_scale_inv"].astype(np.float64)
        per_element_scale = np.kron(scale, np.ones((128, 128)))[: value.shape[0], : value.shape[1]]
        assert np.array_equal(dequantised[name], decode_fp8(fp8[name]) * per_element_scale)
        bound = np.maximum(2.0 ** -4 * np.abs(value), 2.0 ** -10 * per_element_scale) * (1 + 2 ** -20)
        assert np.all(np.abs(dequantised[name] - value) <= bound), name
        assert np.abs(dequantised[name] - value).max() > 0, name  # the checkpoint is really quantised


def test_the_576_row_projection_has_five_row_blocks():
    config = load_preset("deepseek-v3")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    weights = generate_weights(config, names=[name], fp8=True)
    assert weights[name].shape == (576, 7168) and weights[name + "_scale_inv"].shape == (5, 56)
    last_block = dequantize_checkpoint(weights)[name][512:]
    assert np.array_equal(last_block, decode_fp8(weights[name][512:]) * np.repeat(weights[name + "_scale_inv"][4].astype(np.float64), 128)[None, :])


def test_the_reader_refuses_codes_without_scales_and_scales_without_codes(tiny_checkpoint):
    _, fp8 = tiny_checkpoint
    name = "model.layers.0.self_attn.q_a_proj.weight"
    without_scale = {key: value for key, value in fp8.items() if key != name + "_scale_inv"}
    with pytest.raises(WeightError, match=r"q_a_proj\.weight: uint8 fp8 codes without .*weight_scale_inv.*\(FP8.4\)"):
        dequantize_checkpoint(without_scale)
    with pytest.raises(WeightError, match=r"a scale without its tensor"):
        dequantize_checkpoint({key: value for key, value in fp8.items() if key != name})
    wrong_grid = dict(fp8, **{name + "_scale_inv": np.ones((2, 1), dtype=np.float32)})
    with pytest.raises(Exception, match=r"weight_scale_inv: expected shape \[1, 1\], got \[2, 1\] \(FP8.4\)"):
        dequantize_checkpoint(wrong_grid)


def test_mla_refuses_raw_codes_and_runs_on_the_dequantised_checkpoint():
    config = load_preset("tiny")
    fp8 = generate_attention_weights(config, seed=1, fp8=True)
    assert "o_proj.weight_scale_inv" in fp8 and not is_power_of_two(fp8["o_proj.weight_scale_inv"])
    hidden = np.random.default_rng(0).standard_normal((1, 3, config.hidden_size))
    # FP8.13: an FP8 checkpoint goes in as it is and is read through FP8.4
    assert np.array_equal(mla_forward(config, fp8, hidden).output, mla_forward(config, dequantize_checkpoint(fp8), hidden).output)
    codes_only = {name: value for name, value in fp8.items() if not name.endswith("_scale_inv")}
    with pytest.raises(WeightError, match=r"expected a real floating dtype, got uint8; an FP8 checkpoint is read through"):
        mla_forward(config, codes_only, hidden)
    out = mla_forward(config, dequantize_checkpoint(fp8), hidden)
    reference = mla_forward(config, generate_attention_weights(config, seed=1), hidden)
    assert np.isfinite(out.output).all()
    relative = np.linalg.norm(out.output - reference.output) / np.linalg.norm(reference.output)
    assert 0 < relative < 0.1  # e4m3 weights: a few per cent, not a different model
