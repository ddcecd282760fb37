"""Full DeepSeek-V3 attention shapes in float64, past the YaRN original context (slow CI step)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import hidden_states, preset, relative_error
from mla_ref import LatentCache, NaiveCache, PagedLatentCache, mla_forward
from mla_ref.weights import generate_attention_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v3():
    config = preset("deepseek-v3")
    return config, generate_attention_weights(config, seed=0)


def test_v3_prefill_paths_agree_past_the_original_context(v3):
    config, weights = v3
    hidden = hidden_states(config, 2, 48, 1)
    starts = np.array([4090, 70_000])
    whole = mla_forward(config, weights, hidden, starts)
    assert relative_error(mla_forward(config, weights, hidden, starts, attention="absorbed").output, whole.output) <= 1e-12
    assert relative_error(mla_forward(config, weights, hidden, starts, query_chunk=7).output, whole.output) <= 1e-12


def test_v3_chunked_prefill_and_decode_equal_one_prefill(v3):
    config, weights = v3
    hidden = hidden_states(config, 2, 40, 2)
    whole = mla_forward(config, weights, hidden, [0, 0])
    for cache in (LatentCache.empty(config, 2), NaiveCache.empty(config, 2),
                  PagedLatentCache.empty(config, 2, 40, block_size=64, shuffle_seed=0)):
        outputs = []
        for begin, end in [(0, 17), (17, 37), (37, 38), (38, 39), (39, 40)]:
            step = mla_forward(config, weights, hidden[:, begin:end], cache=cache)
            cache = step.cache
            outputs.append(step.output)
        assert relative_error(np.concatenate(outputs, axis=1), whole.output) <= 1e-12, type(cache).__name__
