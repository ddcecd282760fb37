"""Spec <-> code: an instrumented run records every MLA step's outputs with exactly the declared shapes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import BIG_PRESETS, TINY_PRESETS, hidden_states, preset
from mla_ref import LatentCache, NaiveCache, PagedLatentCache, Trace, latent_attention_core, mla_forward
from mla_ref.rope import softmax_scale
from mla_ref.spec import evaluate_shape, load_steps
from mla_ref.weights import generate_attention_weights

FAST_BIG = ["deepseek-v2-lite"]


def run_every_path(config, weights, batch: int, prefix: int, seq: int) -> list:
    """Record every step over the paths that together cover MLA.1-MLA.19; returns [(trace, symbols)], one per path."""
    hidden = hidden_states(config, batch, prefix + seq, 0)
    recorded = []

    def run(**kwargs):
        trace = Trace()
        cache = kwargs.pop("cache", None)
        if cache is not None and prefix:
            cache = mla_forward(config, weights, hidden[:, :prefix], cache=cache).cache
        mla_forward(config, weights, hidden[:, prefix:], cache=cache, trace=trace, **kwargs)
        keys = prefix + seq if cache is not None else seq
        expanded = seq if isinstance(cache, NaiveCache) else keys
        recorded.append((trace, {"batch": batch, "seq": seq, "keys": keys, "expanded": expanded}))

    run(start_positions=np.full(batch, 3))  # naive prefill without a cache
    run(cache=NaiveCache.empty(config, batch))
    run(cache=LatentCache.empty(config, batch))  # absorbed
    paged = PagedLatentCache.empty(config, batch, prefix + seq, block_size=4, shuffle_seed=0)
    run(cache=paged)
    rng = np.random.default_rng(0)
    trace = Trace()
    blocks = rng.standard_normal(paged.blocks.shape)
    lengths = np.full(batch, prefix + seq)
    q = rng.standard_normal((batch, seq, config.num_attention_heads, config.latent_cache_width))
    latent_attention_core(q, blocks, paged.block_table, lengths, config.kv_lora_rank, softmax_scale(config), causal=True, trace=trace)
    symbols = {"batch": batch, "seq": seq, "keys": prefix + seq, "num_blocks": blocks.shape[0], "block_size": 4,
               "max_blocks": paged.block_table.shape[1]}
    recorded.append((trace, symbols))
    return recorded


def check_declared_shapes(config, recorded: list) -> None:
    """Every step recorded on every path has exactly its declared output shapes; every step is recorded somewhere."""
    seen = set()
    for trace, runtime in recorded:
        symbols = {**config.symbols(), **runtime}
        for step in load_steps("mla.yaml"):
            if step["id"] not in trace:
                continue
            seen.add(step["id"])
            for name, shape in step["outputs"].items():
                assert name in trace[step["id"]], f"{step['id']} did not record {name}"
                expected = evaluate_shape(shape, symbols)
                got = trace[step["id"]][name].shape
                assert got == expected, f"{step['id']}.{name}: {got} != {shape} = {expected} (path {runtime})"
    expected_steps = {step["id"] for step in load_steps("mla.yaml")} - (set() if config.q_lora_rank else {"MLA.1"})
    assert seen == expected_steps, f"never recorded: {sorted(expected_steps - seen)}; unexpected: {sorted(seen - expected_steps)}"


@pytest.mark.parametrize("name", [name for name in TINY_PRESETS if not preset(name).sparse_attention])  # DSA: tests/test_dsa.py
def test_tiny_presets_record_declared_shapes(name):
    config = preset(name)
    check_declared_shapes(config, run_every_path(config, generate_attention_weights(config), batch=2, prefix=5, seq=3))


@pytest.mark.parametrize("name", FAST_BIG)
def test_big_presets_record_declared_shapes(name):
    config = preset(name)
    check_declared_shapes(config, run_every_path(config, generate_attention_weights(config), batch=1, prefix=2, seq=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(name for name in set(BIG_PRESETS) - set(FAST_BIG) if not preset(name).sparse_attention))
def test_full_size_presets_record_declared_shapes(name):
    config = preset(name)
    check_declared_shapes(config, run_every_path(config, generate_attention_weights(config), batch=1, prefix=2, seq=2))
