"""The attention plumbing (query chunks, head groups, expanded-key groups) never changes a result.

The block bounds are module constants sized for deepseek-v3 shapes; here they are shrunk so
that a tiny config is split into many blocks of every kind, and compared with one block.
"""

import numpy as np
import pytest

import mla_ref.mla as mla
from mla_ref import LatentCache, generate_attention_weights, load_config, mla_forward

TOL = 1e-12


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
    config = load_config("tiny-yarn")
    weights = generate_attention_weights(config, seed=3)
    hidden = np.random.default_rng(4).standard_normal((2, 21, config.hidden_size))
    return config, weights, hidden


def _run(config, weights, hidden):
    prefill = mla_forward(config, weights, hidden, start_positions=[0, 9])
    cache = mla_forward(config, weights, hidden[:, :13], cache=LatentCache.empty(config, 2), query_lengths=[13, 6]).cache
    extend = {attention: mla_forward(config, weights, hidden[:, 13:], cache=cache, attention=attention, query_lengths=[8, 3])
              for attention in ("naive", "absorbed")}
    return prefill, extend


@pytest.mark.parametrize("logits, query, expanded", [(7, 3, 1), (40, 1, 100), (1, 5, 1)])
def test_blocks_of_heads_and_queries_equal_one_block(setup, monkeypatch, logits, query, expanded):
    config, weights, hidden = setup
    whole_prefill, whole_extend = _run(config, weights, hidden)
    monkeypatch.setattr(mla, "DEFAULT_LOGITS_ELEMENTS", logits)
    monkeypatch.setattr(mla, "DEFAULT_QUERY_CHUNK", query)
    monkeypatch.setattr(mla, "DEFAULT_EXPANDED_ELEMENTS", expanded)
    blocks = mla._attention_blocks(np.ones((2, 21, 30), bool), config.num_attention_heads, None, None, split_heads=True)
    assert len(blocks) > 1
    prefill, extend = _run(config, weights, hidden)
    assert _relative(prefill.output, whole_prefill.output) <= TOL
    assert np.allclose(prefill.lse, whole_prefill.lse, rtol=TOL, atol=0)
    for attention, result in extend.items():
        assert _relative(result.output, whole_extend[attention].output) <= TOL
        finite = np.isfinite(whole_extend[attention].lse)
        assert np.array_equal(finite, np.isfinite(result.lse))
        assert np.allclose(result.lse[finite], whole_extend[attention].lse[finite], rtol=TOL, atol=0)
