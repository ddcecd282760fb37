"""Precision profiles: the emulated forward carries the error its storage format implies, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import attention_weights, hidden_states, preset, relative_error
from mla_ref import InputError, Trace, mla_forward
from mla_ref.conformance.compare import compare_tensor
from mla_ref.precision import UNIT_ROUNDOFF


@pytest.fixture(scope="module")
def tiny_run():
    config = preset("tiny-yarn")
    weights = attention_weights("tiny-yarn")
    hidden = hidden_states(config, 2, 9, 3)
    return config, weights, hidden, mla_forward(config, weights, hidden, [0, 5000])


@pytest.mark.parametrize("profile, low, high", [("fp64", 0, 1e-15), ("fp32", 1e-9, 1e-6), ("tf32", 1e-5, 1e-2),
                                                ("fp16", 1e-5, 1e-2), ("bf16", 1e-4, 5e-2)])
def test_emulated_error_matches_the_format(tiny_run, profile, low, high):
    """Near the start of a sequence the storage format sets the error (far out the float32 RoPE table adds to it: next test)."""
    config, weights, hidden, _ = tiny_run
    truth = mla_forward(config, weights, hidden, [0, 40])
    for attention in ("naive", "absorbed"):
        emulated = mla_forward(config, weights, hidden, [0, 40], attention=attention, trace=Trace(profile, keep=False))
        assert low <= relative_error(emulated.output, truth.output) <= high, (profile, attention)


def test_far_positions_add_the_float32_rope_table_error(tiny_run):
    """rope_table: fp32 — the fp32 emulation's q_pe error grows with the position (p x ulp of the angle, spec/rope.yaml
    ROPE.5), past the storage rounding that sets it near position 0; the exact trace keeps its float64 table."""
    config, weights, hidden, _ = tiny_run
    errors = []
    for start in (0, 5000, 70000):
        exact, emulated = Trace(), Trace("fp32")
        mla_forward(config, weights, hidden, [start, start], trace=exact)
        mla_forward(config, weights, hidden, [start, start], trace=emulated, dtype=emulated.arithmetic)
        truth = exact["MLA.4"]["q_pe"]
        errors.append(float(np.linalg.norm(emulated["MLA.4"]["q_pe"] - truth) / np.linalg.norm(truth)))
    assert exact.rope_table == np.float64 and emulated.rope_table == np.float32 and Trace("bf16").rope_table == np.float32
    assert errors[2] > 100 * errors[0] and errors[1] > 10 * errors[0], errors


def test_every_stored_float_is_representable_in_its_format(tiny_run):
    config, weights, hidden, _ = tiny_run
    trace = Trace("bf16")
    mla_forward(config, weights, hidden, [0, 5000], trace=trace)
    q_nope = trace["MLA.2"]["q_nope"].astype(np.float32)
    assert np.all(q_nope.view(np.uint32) & 0xFFFF == 0)  # bf16: low 16 bits of the float32 are zero
    logits = trace["MLA.9"]["logits"]
    assert np.array_equal(logits, logits.astype(np.float32).astype(np.float64))  # fp32 override
    assert trace["MLA.8"]["visible"].dtype == bool


def test_unknown_profile():
    with pytest.raises(InputError, match=r"precision: unknown profile 'bf8'"):
        Trace("bf8")


def test_noise_relative_rule_accepts_the_emulation_and_rejects_a_scale_bug(tiny_run):
    config, weights, hidden, truth = tiny_run
    emulated = mla_forward(config, weights, hidden, [0, 5000], trace=Trace("bf16", keep=False)).output
    noise = float(np.linalg.norm(emulated - truth.output))
    assert compare_tensor("output", emulated, truth.output, noise, "bf16").passed
    wrong = mla_forward(config.replace(mscale_all_dim=0.0), weights, hidden, [0, 5000], trace=Trace("bf16", keep=False)).output
    verdict = compare_tensor("output", wrong, truth.output, noise, "bf16")
    assert not verdict.passed and verdict.used > 1 and "L2 error" in verdict.reason


def test_comparison_reports_exact_mismatches():
    truth = np.array([[1, 2], [3, 4]])
    verdict = compare_tensor("expert_ids", np.array([[1, 2], [4, 3]]), truth, 0.0, "bf16")
    assert not verdict.passed and "2 of 4 values differ" in verdict.reason and verdict.worst_abs["index"] == [1, 0]
    nan_truth = np.array([1.0, -np.inf, 2.0])
    assert not compare_tensor("lse", np.array([1.0, 0.0, 2.0]), nan_truth, 1e-3, "bf16").passed
    assert compare_tensor("lse", np.array([1.0, -np.inf, 2.0]), nan_truth, 1e-3, "bf16").passed
    shape = compare_tensor("out", np.zeros(3), np.zeros(4), 0.0, "fp32")
    assert not shape.passed and "shape [3], expected [4]" in shape.reason


def test_unit_roundoffs_agree_with_the_spec():
    from mla_ref.spec import load_spec_file
    assert load_spec_file("tolerance.yaml")["formats"] == UNIT_ROUNDOFF


def test_moe_layer_emulation_and_teacher_forcing():
    from mla_ref import ffn_forward
    from mla_ref.moe import sigmoid
    from mla_ref.weights import generate_weights, subtree
    config = preset("tiny")
    weights = subtree(generate_weights(config, seed=2), "model.layers.1.")
    hidden = hidden_states(config, 1, 12, 4)[0]
    truth = ffn_forward(config, weights, hidden, 1)
    emulated = ffn_forward(config, weights, hidden, 1, trace=Trace("bf16", keep=False))
    assert 1e-4 < relative_error(emulated.output, truth.output) < 5e-2
    same = ffn_forward(config, weights, hidden, 1, forced_expert_ids=truth.routing.expert_ids)
    assert np.array_equal(same.output, truth.output)
    forced_ids = truth.routing.expert_ids.copy()
    forced_ids[0] = [e for e in range(config.n_routed_experts) if e not in forced_ids[0]][:config.num_experts_per_tok]
    forced = ffn_forward(config, weights, hidden, 1, forced_expert_ids=forced_ids)
    assert relative_error(forced.output[1:], truth.output[1:]) <= 1e-14  # BLAS may block a different row count differently
    assert not np.allclose(forced.output[0], truth.output[0])
    chosen = forced.routing.scores[0, forced_ids[0]]  # unbiased scores of the forced experts, renormalised and scaled
    expected_weights = chosen / chosen.sum() * config.routed_scaling_factor
    assert np.allclose(forced.routing.weights[0], expected_weights, rtol=1e-14)
    expert = lambda e, x: (lambda g: (g * sigmoid(g) * (x @ weights[f"mlp.experts.{e}.up_proj.weight"].T))
                           @ weights[f"mlp.experts.{e}.down_proj.weight"].T)(x @ weights[f"mlp.experts.{e}.gate_proj.weight"].T)
    shared_gate = hidden[0] @ weights["mlp.shared_experts.gate_proj.weight"].T
    shared = (shared_gate * sigmoid(shared_gate) * (hidden[0] @ weights["mlp.shared_experts.up_proj.weight"].T)) @ weights["mlp.shared_experts.down_proj.weight"].T
    manual = sum(w * expert(e, hidden[0]) for e, w in zip(forced_ids[0], expected_weights)) + shared
    assert relative_error(forced.output[0], manual) <= 1e-12


def test_an_unknown_rope_table_is_refused(monkeypatch):
    from mla_ref import trace as trace_module
    monkeypatch.setattr(trace_module, "profile", lambda name: {"storage": "fp32", "rope_table": "fp16", "overrides": {}})
    with pytest.raises(InputError, match=r"odd.rope_table: expected fp32 or fp64, got 'fp16' \(TOLERANCE.2\)"):
        trace_module.rope_table("odd")


# The format each profile stores weights and float inputs in (spec/tolerance.yaml: `weights` / `inputs`, else `storage`)
# and its mantissa bits; representable values are made here by clearing float32 bits, not by mla_ref.precision.
INPUT_FORMAT = {"bf16": "bf16", "fp16": "fp16", "tf32": "tf32", "fp32": "fp32"}
MANTISSA_BITS = {"bf16": 7, "fp16": 10, "tf32": 10, "fp32": 23}


def representable(x: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "fp16":
        return np.asarray(x).astype(np.float16).astype(np.float64)
    cleared = 23 - MANTISSA_BITS[fmt]
    bits = np.asarray(x, dtype=np.float32).view(np.uint32) & np.uint32((0xFFFFFFFF >> cleared) << cleared)
    return bits.view(np.float32).astype(np.float64)


def below_half_ulp(x: np.ndarray, fmt: str) -> np.ndarray:
    """``x`` (representable in ``fmt``) moved by an eighth of its ulp in ``fmt``: rounding to ``fmt`` brings it back."""
    return x * (1 + 2.0 ** -(MANTISSA_BITS[fmt] + 3))


@pytest.mark.parametrize("profile", sorted(INPUT_FORMAT))
def test_the_emulation_rounds_weights_and_inputs_to_the_profiles_format(profile):
    """Changes below half an ulp of the profile's format in every weight, or in the input, leave the emulation unchanged
    (while they do change the float64 truth): the emulation stores weights and inputs in that format, not finer."""
    from mla_ref import ffn_forward
    from mla_ref.model import model_forward
    from mla_ref.weights import generate_weights, subtree
    fmt = INPUT_FORMAT[profile]
    config = preset("tiny")
    weights = {name: representable(value, fmt) for name, value in attention_weights("tiny").items()}
    hidden = representable(hidden_states(config, 2, 5, 1), fmt)
    nudged_weights = {name: below_half_ulp(value, fmt) for name, value in weights.items()}
    run = lambda w, x, trace=None: mla_forward(config, w, x, [0, 3], trace=trace).output
    emulated = run(weights, hidden, Trace(profile, keep=False))
    assert np.array_equal(run(nudged_weights, hidden, Trace(profile, keep=False)), emulated), "weights not rounded"
    assert np.array_equal(run(weights, below_half_ulp(hidden, fmt), Trace(profile, keep=False)), emulated), "hidden not rounded"
    assert not np.array_equal(run(nudged_weights, hidden), run(weights, hidden))

    model_weights = {name: representable(value, fmt) for name, value in generate_weights(config, seed=1).items()}
    layer = subtree(model_weights, "model.layers.1.")
    nudged_layer = {name: below_half_ulp(value, fmt) for name, value in layer.items()}
    ffn = lambda w, x: ffn_forward(config, w, x, 1, trace=Trace(profile, keep=False)).output
    assert np.array_equal(ffn(nudged_layer, hidden), ffn(layer, hidden)), "MoE weights not rounded"
    assert np.array_equal(ffn(layer, below_half_ulp(hidden, fmt)), ffn(layer, hidden)), "MoE input not rounded"
    tokens = np.array([[3, 1, 4, 1, 5]])
    logits = lambda w: model_forward(config, w, tokens, trace=Trace(profile, keep=False)).logits
    nudged_model = {name: below_half_ulp(value, fmt) for name, value in model_weights.items()}
    assert np.array_equal(logits(nudged_model), logits(model_weights)), "model weights not rounded"
