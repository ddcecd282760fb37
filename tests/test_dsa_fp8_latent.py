"""The fp8 profile holds a V3.2-style latent cache as FP8 records (spec/tolerance.yaml fp8, latent_cache_fp8; FP8.12).

On preset tiny-dsa-r512 (kv_lora_rank 512, rope 64: V3.2's 656-byte record) the profile's emulation of a DSA layer
reads every latent row back from an FP8 record, the cached prefix and the new tokens alike, as DeepSeek's simulation
does (EXP model.py:569-571); the float64 truth and the other profiles keep the float latent, and tiny-dsa
(kv_lora_rank 32) has no whole 128-wide tile to quantise.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import attention_weights, hidden_states, preset
from mla_ref import Fp8LatentCache, LatentCache, Trace, mla_forward
from mla_ref.conformance import reference_adapter
from mla_ref.dsa import SparseCache
from mla_ref.errors import ShapeError
from mla_ref.fp8 import decode_fp8, encode_fp8
from mla_ref.fp8_cache import record_width
from mla_ref.model import ModelCache, greedy_generate
from mla_ref.weights import generate_weights

R512 = "tiny-dsa-r512"


@pytest.fixture(scope="module")
def r512():
    return preset(R512), attention_weights(R512, seed=3)


def on_record_grid(rows: np.ndarray, rank: int) -> bool:
    """Whether every 128-wide latent tile of ``rows [..., rank + rope]`` is e4m3 codes times one power of two no smaller
    than its amax / 448 (what FP8.11 decodes a ue8m0 record to), written independently of mla_ref.fp8_cache."""
    tiles = rows[..., :rank].reshape(rows.shape[:-1] + (rank // 128, 128))
    scale = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(tiles).max(axis=-1, keepdims=True), 1e-4) / 448))
    return bool(np.array_equal(decode_fp8(encode_fp8(tiles / scale)), tiles / scale))


def test_the_preset_has_v32s_record_width():
    config = preset(R512)
    assert (config.kv_lora_rank, config.qk_rope_head_dim) == (512, 64)
    assert record_width(config.kv_lora_rank, config.qk_rope_head_dim) == 656 == 512 + 4 * 4 + 2 * 64
    assert config.index_topk < 30  # sparse within the golden decode's 31 keys


def test_only_the_fp8_profile_on_whole_tiles_holds_records(r512):
    config, _ = r512
    assert Trace("fp8").latent_cache_fp8(config)
    assert not Trace("bf16").latent_cache_fp8(config)
    assert not Trace("fp8").latent_cache_fp8(preset("tiny-dsa"))  # kv_lora_rank 32: no whole tile


def test_the_fp8_emulation_of_dsa_extend_reads_every_latent_row_from_a_record(r512):
    """dsa_extend under the fp8 profile: the cached prefix and the new token's row come back on the record grid (and the
    rope part as bf16); under bf16 and in the truth they do not."""
    config, weights = r512
    prefix, lengths = hidden_states(config, 2, 5, 1), np.array([5, 3])
    cached = reference_adapter.dsa_extend(config.to_dict(), weights, prefix, np.zeros((2, 0, config.latent_cache_width)),
                                          np.zeros((2, 0, config.index_head_dim)), np.zeros(2, np.int64), lengths)
    new = hidden_states(config, 2, 1, 2)
    seen = {}
    for profile in ("fp8", "bf16", None):
        trace = None if profile is None else Trace(profile)
        result = reference_adapter.dsa_extend(config.to_dict(), weights, new, cached["rows"], cached["index_keys"], lengths,
                                              np.ones(2, np.int64), trace=trace)
        seen[profile] = on_record_grid(result["rows"], config.kv_lora_rank)
    assert seen == {"fp8": True, "bf16": False, None: False}


def test_a_prefill_reads_its_rows_as_a_cached_forward_does(r512):
    """Without a cache the fp8 emulation reads the prefill's own rows through the records (V3.2 quantises before both
    paths): the same output as the forward through an empty FP8 SparseCache, and not the bf16-latent output."""
    config, weights = r512
    hidden = hidden_states(config, 1, 12, 4)
    prefill = mla_forward(config, weights, hidden, attention="absorbed", trace=Trace("fp8", keep=False)).output
    empty = SparseCache(Fp8LatentCache.empty(config, 1), LatentCache.empty(config, 1, width=config.index_head_dim))
    cached = mla_forward(config, weights, hidden, cache=empty, trace=Trace("fp8", keep=False))
    assert isinstance(cached.cache.latent, Fp8LatentCache)
    assert np.array_equal(prefill, cached.output)
    float_cache = mla_forward(config, weights, hidden, cache=SparseCache.empty(config, 1), trace=Trace("fp8", keep=False)).output
    assert not np.array_equal(prefill, float_cache)


def test_greedy_decode_under_the_fp8_profile_caches_records():
    config = preset(R512)
    weights = generate_weights(config, seed=0)
    emulated = greedy_generate(config, weights, [[3, 1, 4]], 2, trace=Trace("fp8", keep=False))
    truth = greedy_generate(config, weights, [[3, 1, 4]], 2)
    assert all(isinstance(layer.latent, Fp8LatentCache) for layer in emulated.cache.layers)
    assert all(isinstance(layer.latent, LatentCache) for layer in truth.cache.layers)
    assert on_record_grid(emulated.cache.layers[0].key_rows(), config.kv_lora_rank)


def test_an_fp8_model_cache_needs_whole_tiles():
    with pytest.raises(ShapeError, match="kv_lora_rank.*multiple of 128"):
        ModelCache.empty(preset("tiny"), 1, kind="fp8")


@pytest.mark.slow
@pytest.mark.torch
def test_the_torch_adapter_reads_its_dsa_cache_through_records_and_a_bf16_latent_passes_too():
    """examples/torch_adapter.py in mode fp8 holds the DSA layer's latent as FP8 records, as V3.2 does: its error on the
    decode output is several times that of the same adapter with a bf16 latent cache (measured 13.6% and 2.0% of the
    allowance). The bf16 latent is no bug the fp8 profile can reject: more precise than the emulation, it passes."""
    pytest.importorskip("torch")
    from mla_ref.conformance.check import check
    from mutants import mutate
    bf16_latent = {"name": "bf16_latent_cache", "replace": "key_rows = key_rows.clone()  # a bf16 latent cache, no FP8 records",
                   "find": "key_rows = decode_records(encode_records(key_rows, latent_tile_scales(key_rows[..., :rank])), rank)  # [batch, keys, width]"}
    used = {}
    with mutate.one_torch_thread():
        for name, entry in (("records", None), ("bf16 latent", bf16_latent)):
            report = check(mutate.load(entry, "fp8"), profile="fp8", select="dsa.extend.decode/tiny-dsa-r512/")
            assert report.ok, report.table()
            used[name] = next(comparison.used for comparison in report.cases[0].comparisons if comparison.name == "output")
    assert used["bf16 latent"] < used["records"] / 3, used
