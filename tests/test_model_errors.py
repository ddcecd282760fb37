"""Bad input to the decoder stack: every rejection is a typed error naming the field or tensor, expected vs actual,
and the spec id."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import preset
from mla_ref import CacheError, InputError, LatentCache, ShapeError, WeightError
from mla_ref.model import ModelCache, greedy_generate, model_forward
from mla_ref.weights import generate_weights


@functools.lru_cache(maxsize=None)
def model():
    config = preset("tiny")
    return config, generate_weights(config, 0)


def test_token_ids_out_of_vocabulary():
    config, weights = model()
    with pytest.raises(InputError, match=r"tokens: expected ids in 0 \.\. 96 \(vocab_size\), got 97 at sequence 0, position 2 \(MODEL.1\)"):
        model_forward(config, weights, np.array([[1, 2, 97]]))
    with pytest.raises(InputError, match=r"got -3 at sequence 1, position 0"):
        greedy_generate(config, weights, [[1], [-3, 4]], 2)


def test_padding_ids_are_not_checked_but_real_ones_are():
    config, weights = model()
    assert model_forward(config, weights, np.array([[1, 2, 97]]), query_lengths=[2]).logits.shape == (1, 3, 97)
    with pytest.raises(InputError, match=r"got 97 at sequence 0, position 2"):
        model_forward(config, weights, np.array([[1, 2, 97]]), query_lengths=[3])


def test_tokens_of_the_wrong_kind():
    config, weights = model()
    with pytest.raises(ShapeError, match=r"tokens: expected integer ids of shape \[batch, seq\], got float64 \[1, 2\] \(MODEL.1\)"):
        model_forward(config, weights, np.array([[1.0, 2.0]]))
    with pytest.raises(ShapeError, match=r"tokens: expected integer ids of shape \[batch, seq\], got int64 \[3\]"):
        model_forward(config, weights, np.array([1, 2, 3]))
    with pytest.raises(ShapeError, match=r"query_lengths: expected integers in 0 \.\. 2 of shape \[1\], got int64 \[3\]"):
        model_forward(config, weights, np.array([[1, 2]]), query_lengths=[3])


def test_empty_or_malformed_prompts():
    config, weights = model()
    with pytest.raises(InputError, match=r"prompt 1: expected a non-empty 1-D sequence of integer ids"):
        greedy_generate(config, weights, [[1, 2], []], 2)
    with pytest.raises(InputError, match=r"prompts: expected a non-empty sequence"):
        greedy_generate(config, weights, [], 2)
    with pytest.raises(InputError, match=r"max_new_tokens: expected an int >= 0, got -1 \(MODEL.6\)"):
        greedy_generate(config, weights, [[1, 2]], -1)


def test_a_prompt_longer_than_the_cache():
    config, weights = model()
    cache = ModelCache.empty(config, 2, kind="paged", max_tokens=5, block_size=2)
    with pytest.raises(CacheError, match=r"block_table: sequence 1 needs position 6, beyond its 3 blocks of 2 \(MLA.19\)"):
        greedy_generate(config, weights, [[1, 2], [1, 2, 3, 4, 5, 6, 7]], 1, cache)
    with pytest.raises(CacheError, match=r"beyond its 3 blocks of 2"):  # the prompt fits, the generation does not
        greedy_generate(config, weights, [[1, 2, 3, 4, 5]], 3, ModelCache.empty(config, 1, kind="paged", max_tokens=5, block_size=2))


def test_positions_beyond_the_model():
    config, weights = model()
    with pytest.raises(InputError, match=r"positions: sequence 0 reaches position 4096, expected < max_position_embeddings = 4096 \(MLA.4\)"):
        model_forward(config, weights, np.array([[1, 2]]), start_positions=[4095])


def test_caches_that_do_not_fit():
    config, weights = model()
    tokens = np.array([[1, 2]])
    with pytest.raises(CacheError, match=r"cache: expected a ModelCache \(one cache per layer\), got LatentCache \(MODEL.2\)"):
        model_forward(config, weights, tokens, LatentCache.empty(config, 1))
    with pytest.raises(CacheError, match=r"cache: expected 3 layer caches, got 2"):
        model_forward(config, weights, tokens, ModelCache.empty(config, 1, num_layers=2))
    with pytest.raises(CacheError, match=r"expected batch 1, got 2"):
        model_forward(config, weights, tokens, ModelCache.empty(config, 2))
    uneven = ModelCache.empty(config, 1)
    grown = model_forward(config, weights, tokens, uneven).cache
    mixed = ModelCache((grown.layers[0], uneven.layers[1], uneven.layers[2]))
    with pytest.raises(CacheError, match=r"cache.layers\[1\]: holds \[0\] positions, layer 0 holds \[2\]"):
        model_forward(config, weights, tokens, mixed)
    with pytest.raises(CacheError, match=r"max_tokens: a paged cache needs a capacity max_tokens >= 1, got None \(MLA.19\)"):
        ModelCache.empty(config, 1, kind="paged")
    with pytest.raises(CacheError, match=r"kind: expected one of \['latent', 'naive', 'paged', 'fp8'\], got 'flash'"):
        ModelCache.empty(config, 1, kind="flash")


def test_missing_or_misshaped_model_tensors():
    config, weights = model()
    tokens = np.array([[1, 2]])
    without_norm = {name: value for name, value in weights.items() if name != "model.norm.weight"}
    with pytest.raises(WeightError, match=r"model.norm.weight: missing \(expected shape \[64\]\) \(MODEL.1\)"):
        model_forward(config, without_norm, tokens)
    transposed = dict(weights, **{"lm_head.weight": weights["lm_head.weight"].T})
    with pytest.raises(WeightError, match=r"lm_head.weight: expected a float tensor of shape \[97, 64\], got float64 \[64, 97\]"):
        model_forward(config, transposed, tokens)
    without_layer_norm = {name: value for name, value in weights.items() if name != "model.layers.2.post_attention_layernorm.weight"}
    with pytest.raises(WeightError, match=r"model.layers.2.post_attention_layernorm.weight: missing"):
        model_forward(config, without_layer_norm, tokens)
    without_attention = {name: value for name, value in weights.items() if name != "model.layers.1.self_attn.kv_b_proj.weight"}
    with pytest.raises(WeightError, match=r"kv_b_proj.weight: missing"):
        model_forward(config, without_attention, tokens)
