"""spec/mtp.yaml <-> mla_ref: instrumented runs (the training chain; speculative decoding) record exactly the declared
outputs in exactly the declared symbolic shapes (config symbols plus batch, seq, depth, depths). Step ids,
docstrings and entry points: test_spec.py."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_PRESETS, preset
from mla_ref import Trace
from mla_ref.mtp import mtp_losses
from mla_ref.spec import load_steps
from mla_ref.speculative import speculative_generate
from mla_ref.weights import generate_weights
from test_model_spec import check_recorded_shapes

STEPS = load_steps("mtp.yaml")
TRAINING = [step for step in STEPS if int(step["id"].split(".")[1]) <= 6]
SPECULATIVE = [step for step in STEPS if int(step["id"].split(".")[1]) >= 7]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_instrumented_runs_record_the_declared_shapes(name):
    depths, batch, seq = 2, 2, 5
    config = preset(name).replace(num_nextn_predict_layers=depths)
    weights = generate_weights(config, 0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, seq + 1))
    symbols = {**config.symbols(), "batch": batch, "seq": seq, "depth": depths, "depths": depths}
    trace = Trace()
    mtp_losses(config, weights, tokens, trace=trace)
    check_recorded_shapes(TRAINING, trace, symbols)
    assert {step for step in trace.steps if step.startswith("MTP.")} == {step["id"] for step in TRAINING}, "training records a speculative step"
    trace = Trace()
    speculative_generate(config, weights, [[1, 2, 3], [4, 5]], 4, trace=trace)
    check_recorded_shapes(SPECULATIVE, trace, symbols)
    assert {step["id"] for step in SPECULATIVE} <= set(trace.steps) and not {"MTP.5", "MTP.6"} & set(trace.steps), "drafting computes a loss"
