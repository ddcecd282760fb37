"""mla_ref.testing: the exported strategies draw what they promise (meta-tests), and fuzz the loaders and MLA."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from mla_ref import testing
from mla_ref.config import load_config
from mla_ref.errors import ConfigError
from mla_ref.mla import mla_forward
from mla_ref.weights import generate_attention_weights

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(testing.configs())
def test_drawn_configs_are_valid_and_round_trip(config):
    assert load_config(config.to_dict()) == config


@FAST
@given(testing.configs())
def test_both_transformers_styles_load_to_the_drawn_config(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key of either style may be unknown
        loaded = [load_config(testing.hf_config_dict(config, style), strict=True) for style in ("transformers4", "transformers5")]
    for other in loaded:
        differing = {name for name, value in config.to_dict().items() if getattr(other, name) != value}
        assert differing <= {"name", "source"}


@FAST
@given(testing.invalid_field_values())
def test_invalid_field_values_are_named(field_value):
    field, value = field_value
    base = load_config("tiny")
    with pytest.raises(ConfigError) as caught:
        base.replace(**{field: value})
    assert caught.value.what == field or caught.value.spec_id.startswith("CONFIG.R")


@FAST
@given(testing.configs(), testing.data())
def test_mla_forward_is_finite_on_drawn_configs_and_inputs(config, data):
    hidden = data.draw(testing.hidden_states(config))
    output = mla_forward(config, generate_attention_weights(config), hidden).output
    assert output.shape == hidden.shape and np.isfinite(output).all()


@FAST
@given(testing.configs(), testing.data())
def test_token_ids_are_in_the_vocabulary(config, data):
    tokens = data.draw(testing.token_ids(config))
    assert tokens.ndim == 2 and tokens.min() >= 0 and tokens.max() < config.vocab_size
