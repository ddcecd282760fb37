"""MTP chain and losses in float64: the vectorised chain equals a slow independent loop (tests/independent_model.py),
the documented closed-form value, the convention options, and bad input."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TINY_PRESETS, preset, relative_error
from independent_model import slow_losses
from mla_ref import ConfigError, InputError, WeightError
from mla_ref.mtp import mtp_losses
from mla_ref.weights import generate_weights

TOL = 1e-12
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPTIONS = {"mtp_concat_order": ["embedding_first", "hidden_first"], "mtp_hidden_source": ["post_norm", "pre_norm"],
           "mtp_rope_position": ["hidden", "token"]}


@functools.lru_cache(maxsize=None)
def weights_for(name: str, depths: int, seed: int = 0):
    """Weights of a tiny preset with ``depths`` MTP modules (the convention fields do not change the weights)."""
    return generate_weights(preset(name).replace(num_nextn_predict_layers=depths), seed)


def tokens_for(config, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(batch, seq + 1))


@SETTINGS
@given(name=st.sampled_from(TINY_PRESETS), depths=st.integers(1, 3), seq=st.integers(4, 6), seed=st.integers(0, 3),
       options=st.fixed_dictionaries({field: st.sampled_from(choices) for field, choices in OPTIONS.items()}),
       mtp_lambda=st.sampled_from([0.3, 0.1, 1.0]))
def test_vectorised_losses_equal_the_slow_independent_loop(name, depths, seq, seed, options, mtp_lambda):
    config = preset(name).replace(num_nextn_predict_layers=depths, **options)
    weights = weights_for(name, depths, seed)
    tokens = tokens_for(config, 2, seq, seed)
    fast = mtp_losses(config, weights, tokens, mtp_lambda=mtp_lambda)
    slow = slow_losses(config, weights, tokens.tolist(), depths, mtp_lambda)
    assert fast.main_loss == pytest.approx(slow["main"], rel=TOL)
    assert relative_error(fast.depth_losses, np.array(slow["depths"])) <= TOL
    assert fast.mtp_loss == pytest.approx(slow["mtp"], rel=TOL)
    assert fast.total_loss == pytest.approx(slow["total"], rel=TOL)
    for depth, (logits, expected) in enumerate(zip(fast.depth_logits, slow["logits"]), start=1):
        assert logits.shape == (2, seq - depth, config.vocab_size)
        assert relative_error(logits, expected) <= TOL


@pytest.mark.parametrize("modules, depths", [(1, 3), (2, 3), (2, 5)])
def test_modulo_reuse_equals_the_slow_loop_and_distinct_modules_holding_copies(modules, depths):
    """Depth k of modulo reuse runs module ((k - 1) mod M) + 1: the same as D distinct modules whose weights are those copies."""
    config = preset("tiny").replace(num_nextn_predict_layers=modules, mtp_depths=depths, mtp_module_reuse="modulo")
    weights, tokens = weights_for("tiny", modules), tokens_for(config, 2, 7)
    reused = mtp_losses(config, weights, tokens)
    slow = slow_losses(config, weights, tokens.tolist(), depths)
    assert relative_error(reused.depth_losses, np.array(slow["depths"])) <= TOL
    first = config.num_hidden_layers
    copies = dict(weights)
    for depth in range(modules + 1, depths + 1):
        source = (depth - 1) % modules
        copies.update({name.replace(f"layers.{first + source}.", f"layers.{first + depth - 1}.", 1): value
                       for name, value in weights.items() if name.startswith(f"model.layers.{first + source}.")})
    distinct = mtp_losses(preset("tiny").replace(num_nextn_predict_layers=depths), copies, tokens)
    for logits, expected in zip(reused.depth_logits, distinct.depth_logits):
        assert np.array_equal(logits, expected)


def test_reuse_configs_outside_the_rules_are_rejected():
    config = preset("tiny")
    with pytest.raises(ConfigError, match=r"mtp_depths: expected <= num_nextn_predict_layers = 2 .* got 3 \(CONFIG.R7\)"):
        config.replace(mtp_depths=3)
    with pytest.raises(ConfigError, match=r"num_nextn_predict_layers: expected == 1 .* 'recurrent', got 2 \(CONFIG.R8\)"):
        config.replace(mtp_module_reuse="recurrent")
    with pytest.raises(ConfigError, match=r"num_nextn_predict_layers: expected >= 1 with mtp_module_reuse 'modulo', got 0 \(CONFIG.R8\)"):
        config.replace(num_nextn_predict_layers=0, mtp_module_reuse="modulo")
    recurrent = config.replace(num_nextn_predict_layers=1, mtp_depths=3, mtp_module_reuse="recurrent")
    with pytest.raises(ConfigError, match=r"num_nextn_predict_layers: expected a depth in 1 \.\. 1 .*'recurrent'\), got 3 \(MTP.3\)"):
        mtp_losses(recurrent, weights_for("tiny", 1), tokens_for(config, 1, 5))  # a drafting scheme: training runs one module
    assert mtp_losses(recurrent, weights_for("tiny", 1), tokens_for(config, 1, 5), depths=1).depth_losses.shape == (1,)


def test_documented_closed_form_for_one_depth_and_lambda_0_3():
    """spec/mtp.yaml conventions.loss_example: a zero head makes every probability 1/97."""
    config = preset("tiny").replace(num_nextn_predict_layers=1)
    weights = dict(weights_for("tiny", 1), **{"lm_head.weight": np.zeros((97, config.hidden_size))})
    tokens = tokens_for(config, 3, 4, seed=5)
    result = mtp_losses(config, weights, tokens)
    ln_vocab = math.log(97)
    assert result.main_loss == pytest.approx(4.574710978503383, rel=1e-14) == pytest.approx(ln_vocab, rel=1e-14)
    assert result.depth_losses.tolist() == pytest.approx([3.431033233877537], rel=1e-14)  # (T - 1) / T * ln 97, T = 4
    assert result.depth_losses[0] == pytest.approx((4 - 1) / 4 * ln_vocab, rel=1e-14)
    assert result.mtp_loss == pytest.approx(1.029309970163261, rel=1e-14)
    assert result.total_loss == pytest.approx(5.604020948666644, rel=1e-14)


def test_lambda_scales_only_the_mtp_loss():
    config = preset("tiny")
    weights = weights_for("tiny", 2)
    tokens = tokens_for(config, 1, 5)
    default, tenth = mtp_losses(config, weights, tokens), mtp_losses(config, weights, tokens, mtp_lambda=0.1)
    assert default.mtp_loss == pytest.approx(0.3 / 2 * default.depth_losses.sum(), rel=1e-14)
    assert tenth.mtp_loss == pytest.approx(default.mtp_loss / 3, rel=1e-14)
    assert tenth.main_loss == default.main_loss and np.array_equal(tenth.depth_losses, default.depth_losses)


@pytest.mark.parametrize("field", ["mtp_concat_order", "mtp_hidden_source"])
def test_both_choices_run_and_differ(field):
    base = preset("tiny")
    weights = weights_for("tiny", 2)
    tokens = tokens_for(base, 2, 5)
    first, second = (mtp_losses(base.replace(**{field: choice}), weights, tokens) for choice in OPTIONS[field])
    for depth in range(2):
        assert relative_error(first.depth_logits[depth], second.depth_logits[depth]) > 1e-3
    assert np.array_equal(first.main_logits, second.main_logits)


def test_both_rope_positions_run_and_differ_only_by_rounding():
    """RoPE is relative and every row of a module moves by k: the choices agree up to rounding (spec/mtp.yaml rope_position)."""
    base = preset("tiny-yarn").replace(num_nextn_predict_layers=2)
    weights = weights_for("tiny-yarn", 2)
    tokens = tokens_for(base, 2, 6)
    hidden, token = (mtp_losses(base.replace(mtp_rope_position=choice), weights, tokens) for choice in OPTIONS["mtp_rope_position"])
    for depth in range(2):
        assert not np.array_equal(hidden.depth_logits[depth], token.depth_logits[depth])
        assert relative_error(token.depth_logits[depth], hidden.depth_logits[depth]) <= TOL


def test_a_module_reads_the_previous_depths_post_norm_output():
    """Depth 2 changes when only module 1's shared_head.norm changes: the chain carries h^1 after that norm."""
    config = preset("tiny")
    weights = weights_for("tiny", 2)
    name = f"model.layers.{config.num_hidden_layers}.shared_head.norm.weight"
    changed = dict(weights, **{name: 2 * weights[name] + 0.5})
    tokens = tokens_for(config, 1, 5)
    base, moved = mtp_losses(config, weights, tokens), mtp_losses(config, changed, tokens)
    assert relative_error(moved.depth_logits[1], base.depth_logits[1]) > 1e-3


# ------------------------------------------------------------------ bad input

def test_sequences_too_short_for_the_depth_are_rejected():
    config = preset("tiny")
    weights = weights_for("tiny", 2)
    with pytest.raises(InputError, match=r"tokens: depth 2 needs seq > 2 .* got seq = 2: depth 3 would have no row \(MTP.2\)"):
        mtp_losses(config, weights, tokens_for(config, 1, 2))
    with pytest.raises(InputError, match=r"seq = 1: depth 2 would have no row"):
        mtp_losses(config, weights, tokens_for(config, 1, 1))
    assert mtp_losses(config, weights, tokens_for(config, 1, 3)).depth_logits[1].shape == (1, 1, 97)


def test_more_depths_than_the_config_has_are_rejected():
    config = preset("tiny")
    with pytest.raises(ConfigError, match=r"num_nextn_predict_layers: expected a depth in 1 \.\. 2 .* got 3 \(MTP.3\)"):
        mtp_losses(config, weights_for("tiny", 2), tokens_for(config, 1, 5), depths=3)
    with pytest.raises(ConfigError, match=r"expected a depth in 1 \.\. 0"):
        mtp_losses(config.replace(num_nextn_predict_layers=0), weights_for("tiny", 2), tokens_for(config, 1, 5))


def test_more_depths_than_the_weights_provide_are_rejected():
    config = preset("tiny").replace(num_nextn_predict_layers=3)
    with pytest.raises(WeightError, match=r"model\.layers\.5\.input_layernorm\.weight: missing .*\(MTP.2\)"):
        mtp_losses(config, weights_for("tiny", 2), tokens_for(config, 1, 5))


def test_tokens_out_of_vocabulary_are_rejected():
    config = preset("tiny")
    tokens = tokens_for(config, 2, 5)
    tokens[1, 3] = 97
    with pytest.raises(InputError, match=r"tokens: expected ids in 0 \.\. 96 \(vocab_size\), got 97 at sequence 1, position 3 \(MODEL.1\)"):
        mtp_losses(config, weights_for("tiny", 2), tokens)
    tokens[1, 3] = -1
    with pytest.raises(InputError, match=r"got -1 at sequence 1, position 3"):
        mtp_losses(config, weights_for("tiny", 2), tokens)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.3", True])
def test_bad_lambda_is_rejected(bad):
    config = preset("tiny")
    with pytest.raises(InputError, match=r"mtp_lambda: expected a finite float >= 0"):
        mtp_losses(config, weights_for("tiny", 2), tokens_for(config, 1, 5), mtp_lambda=bad)
