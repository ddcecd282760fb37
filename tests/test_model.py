"""The decoder stack in float64 (relative error <= 1e-12): the slow independent oracle, cached greedy generation
against uncached recomputation at every step, ragged batches against each prompt alone, padding, ties and the loss."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TINY_PRESETS, preset, relative_error
from independent_model import slow_main
from mla_ref import Trace
from mla_ref.model import ModelCache, cross_entropy, greedy_generate, greedy_token, model_forward
from mla_ref.weights import generate_weights

TOL = 1e-12
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def model(name: str = "tiny", seed: int = 0):
    """A tiny preset and its full weights (shared, read-only by convention)."""
    config = preset(name)
    return config, generate_weights(config, seed)


def prompts_of(lengths, vocab, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length).tolist() for length in lengths]


def cache_of(kind, config, batch):
    return ModelCache.empty(config, batch, kind=kind, max_tokens=32, block_size=3, shuffle_seed=7)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_forward_equals_the_slow_independent_oracle(name):
    config, weights = model(name, 1)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 6))
    result = model_forward(config, weights, tokens, start_positions=np.array([0, 0]))
    for b in range(2):
        pre, post, logits = slow_main(config, weights, tokens[b].tolist())
        assert relative_error(result.pre_norm_hidden[b], np.array(pre)) <= TOL
        assert relative_error(result.post_norm_hidden[b], np.array(post)) <= TOL
        assert relative_error(result.logits[b], np.array(logits)) <= TOL


@SETTINGS
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), kind=st.sampled_from(["latent", "naive", "paged"]),
       seed=st.integers(0, 99))
def test_cached_greedy_equals_uncached_recomputation_at_every_step(lengths, kind, seed):
    config, weights = model()
    prompts = prompts_of(lengths, config.vocab_size, seed)
    generated = greedy_generate(config, weights, prompts, 5, cache_of(kind, config, len(prompts)))
    for b, prompt in enumerate(prompts):
        for step in range(5):
            sequence = np.array([prompt + generated.tokens[b, :step].tolist()])
            logits = model_forward(config, weights, sequence).logits[0, -1]  # no cache: the whole sequence again
            assert relative_error(generated.logits[b, step], logits) <= TOL
            assert generated.tokens[b, step] == int(np.argmax(logits))
    assert generated.cache.lengths.tolist() == [length + 4 for length in lengths]


@SETTINGS
@given(lengths=st.lists(st.integers(1, 7), min_size=2, max_size=4), seed=st.integers(0, 99))
def test_ragged_batch_equals_each_prompt_alone(lengths, seed):
    config, weights = model("tiny-v2")
    prompts = prompts_of(lengths, config.vocab_size, seed)
    together = greedy_generate(config, weights, prompts, 4)
    for b, prompt in enumerate(prompts):
        alone = greedy_generate(config, weights, [prompt], 4)
        assert together.tokens[b].tolist() == alone.tokens[0].tolist()
        assert relative_error(together.logits[b], alone.logits[0]) <= TOL


def test_padding_rows_are_exactly_zero_and_never_cached():
    config, weights = model()
    tokens = np.array([[5, 6, 7, 8], [9, 10, -1, 500]])  # padding ids are never read
    result = model_forward(config, weights, tokens, ModelCache.empty(config, 2), query_lengths=[4, 2])
    assert not result.logits[1, 2:].any() and not result.pre_norm_hidden[1, 2:].any()
    assert result.cache.lengths.tolist() == [4, 2]
    alone = model_forward(config, weights, tokens[1:, :2])
    assert relative_error(result.logits[1, :2], alone.logits[0]) <= TOL


def test_chunked_prefill_and_decode_equal_one_prefill():
    config, weights = model("tiny-yarn")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 9))
    whole = model_forward(config, weights, tokens)
    cache, logits = ModelCache.empty(config, 2), []
    for begin, end in [(0, 4), (4, 5), (5, 9)]:
        step = model_forward(config, weights, tokens[:, begin:end], cache)
        cache = step.cache
        logits.append(step.logits)
    assert relative_error(np.concatenate(logits, axis=1), whole.logits) <= TOL


def test_naive_and_absorbed_attention_agree_at_model_level():
    config, weights = model()
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(1, 6))
    absorbed = model_forward(config, weights, tokens[:, 3:], model_forward(config, weights, tokens[:, :3], ModelCache.empty(config, 1)).cache)
    naive = model_forward(config, weights, tokens[:, 3:], model_forward(config, weights, tokens[:, :3], ModelCache.empty(config, 1)).cache,
                          attention="naive")
    assert relative_error(absorbed.logits, naive.logits) <= TOL


def test_a_uniform_position_shift_changes_only_rounding():
    """RoPE logits depend on position differences only (why MTP's two RoPE position choices agree, spec/mtp.yaml)."""
    config, weights = model("tiny-yarn")
    tokens = np.array([[1, 2, 3]])
    at_zero = model_forward(config, weights, tokens, start_positions=[0]).logits
    shifted = model_forward(config, weights, tokens, start_positions=[5000]).logits
    assert not np.array_equal(at_zero, shifted) and relative_error(shifted, at_zero) <= 1e-12


def test_greedy_ties_go_to_the_lowest_token_id():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -1.0, -2.0, -1.0]])
    assert greedy_token(logits).tolist() == [1, 0, 0]


def test_uniform_logits_give_ln_vocab_and_a_peaked_row_its_closed_form():
    config, weights = model()
    flat = dict(weights, **{"lm_head.weight": np.zeros_like(weights["lm_head.weight"])})
    tokens = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    logits = model_forward(config, flat, tokens[:, :-1]).logits
    assert cross_entropy(logits, tokens[:, 1:], 4) == pytest.approx(math.log(97), rel=1e-14)
    peaked = np.zeros((1, 1, 3))
    peaked[0, 0, 2] = math.log(2.0)  # probabilities 1/4, 1/4, 1/2
    assert cross_entropy(peaked, np.array([[2]]), 1) == pytest.approx(math.log(2.0), rel=1e-14)
    assert cross_entropy(peaked, np.array([[0]]), 1) == pytest.approx(math.log(4.0), rel=1e-14)
    big = np.array([[[1000.0, 0.0]]])  # no overflow
    assert cross_entropy(big, np.array([[1]]), 1) == pytest.approx(1000.0, rel=1e-14)


def test_dense_and_moe_layers_follow_first_k_dense_replace():
    config, weights = model()
    assert config.dense_layers == [0] and config.moe_layers == [1, 2]
    tokens = np.array([[1, 2, 3]])
    changed = dict(weights, **{"model.layers.0.mlp.down_proj.weight": 2 * weights["model.layers.0.mlp.down_proj.weight"]})
    assert relative_error(model_forward(config, changed, tokens).logits, model_forward(config, weights, tokens).logits) > 1e-6


def test_a_precision_trace_rounds_every_model_step():
    """Trace(precision=...) rounds the MODEL steps' outputs and weights too (spec/tolerance.yaml TOLERANCE.2)."""
    config, weights = model()
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 5))
    exact = model_forward(config, weights, tokens).logits
    emulated = model_forward(config, weights, tokens, trace=Trace(precision="fp32")).logits
    assert 0 < relative_error(emulated, exact) <= 1e-6
