"""spec/model.yaml <-> mla_ref: every MODEL step names a function whose docstring cites its id and a paper
equation on its first line, and an instrumented run records exactly the declared outputs in exactly the
declared symbolic shapes (config symbols plus the runtime batch and seq)."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import TINY_PRESETS, preset
from mla_ref import Trace
from mla_ref.model import greedy_generate, model_forward
from mla_ref.mtp import mtp_losses
from mla_ref.spec import evaluate_shape, load_spec_file, load_steps, resolve_function
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


def test_steps_are_numbered_in_order_and_complete():
    assert load_spec_file("model.yaml")["section"] == "MODEL"
    assert [step["id"] for step in STEPS] == [f"MODEL.{i}" for i in range(1, len(STEPS) + 1)]
    for step in STEPS:
        assert step["paper"] and step["equation"] and step["pitfalls"], step["id"]


@pytest.mark.parametrize("step", STEPS, ids=[step["id"] for step in STEPS])
def test_every_step_names_a_function_citing_its_id_and_the_paper(step):
    first_line = resolve_function(step["function"]).__doc__.strip().splitlines()[0]
    assert first_line.startswith(f"{step['id']} — "), first_line
    assert "V3R" in first_line, first_line


def test_entry_points_exist():
    for entry in load_spec_file("model.yaml")["entry_points"].values():
        assert callable(resolve_function(entry["function"]))


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
