"""spec/model.yaml <-> mla_ref: an instrumented run records exactly the declared outputs in exactly the declared
symbolic shapes (config symbols plus the runtime batch and seq). Step ids, docstrings and entry points: test_spec.py."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import TINY_PRESETS, preset
from mla_ref import Trace
from mla_ref.model import greedy_generate, model_forward
from mla_ref.mtp import mtp_losses
from mla_ref.spec import evaluate_shape, load_steps
from mla_ref.weights import generate_weights

STEPS = load_steps("model.yaml")



def check_recorded_shapes(steps, trace, symbols):
    """Every step of ``steps`` recorded exactly its declared outputs, each of its declared shape."""
    for step in steps:
        assert step["id"] in trace, f"{step['id']} was never recorded"
        recorded = trace[step["id"]]
        assert sorted(recorded) == sorted(step["outputs"]), step["id"]
        for name, shape in step["outputs"].items():
            assert recorded[name].shape == evaluate_shape(shape, symbols), f"{step['id']}.{name}: {recorded[name].shape} vs {shape}"


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_an_instrumented_run_records_the_declared_shapes(name):
    config = preset(name).replace(num_nextn_predict_layers=1)
    weights = generate_weights(config, 0)
    batch, seq = 2, 5
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, seq + 1))
    symbols = {**config.symbols(), "batch": batch, "seq": seq}
    forward, generation, losses = Trace(), Trace(), Trace()
    model_forward(config, weights, tokens[:, :seq], trace=forward)
    check_recorded_shapes(STEPS[:5], forward, symbols)  # MODEL.1-MODEL.5
    greedy_generate(config, weights, tokens[:, :2].tolist(), 2, trace=generation)
    check_recorded_shapes(STEPS[5:6], generation, symbols)  # MODEL.6
    mtp_losses(config, weights, tokens, trace=losses)
    check_recorded_shapes(STEPS[6:], losses, {**symbols, "rows": seq})  # MODEL.7
