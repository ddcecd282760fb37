"""The FP8 latent cache (spec/fp8.yaml FP8.9-FP8.12): records built byte by byte with struct (independent of the encoder),
the writers' scale rules from their published formulas, and the cache kind and kernel contract against the float rows."""

from __future__ import annotations

import functools
import struct

import numpy as np
import pytest

from mla_ref import Fp8LatentCache, LatentCache, generate_attention_weights, latent_attention_core, load_preset, mla_forward
from mla_ref.errors import CacheError, InputError, NumericError, ShapeError
from mla_ref.fp8 import act_quant
from mla_ref.fp8_cache import (decode_latent_record, encode_latent_record, latent_tile_scale, record_width)

# e4m3fn codes and their values (OFP8: bias 7, 3 mantissa bits): 1.0, 2.0, 448, -1.5, 2^-9 (smallest subnormal), 0
KNOWN_CODES = {0x38: 1.0, 0x40: 2.0, 0x7E: 448.0, 0xBC: -1.5, 0x01: 2.0 ** -9, 0x00: 0.0}


def hand_record(codes: list[int], scales: list[float], rope: list[float]) -> np.ndarray:
    """A record written byte by byte: codes, little-endian float32 scales, the top halves of little-endian float32 rope values."""
    rope_bytes = b"".join(struct.pack("<f", value)[2:] for value in rope)  # exact for values that are bf16
    return np.frombuffer(bytes(codes) + struct.pack(f"<{len(scales)}f", *scales) + rope_bytes, dtype=np.uint8)


def test_a_v3_record_is_656_bytes_in_the_published_order():
    assert record_width(512, 64) == 656
    codes = [list(KNOWN_CODES)[i % len(KNOWN_CODES)] for i in range(512)]
    scales, rope = [0.5, 2.0 ** -7, 3.0, 0.01], [1.5, -0.25] * 32
    record = hand_record(codes, scales, rope)
    rows = decode_latent_record(record, 512, 64)
    expected = [KNOWN_CODES[code] * float(np.float32(scales[i // 128])) for i, code in enumerate(codes)] + rope
    assert rows.shape == (576,) and np.array_equal(rows, np.array(expected))


def test_encoding_writes_the_bytes_a_hand_built_record_holds():
    values = np.array([KNOWN_CODES[code] for code in KNOWN_CODES] * 22)[:128]  # one tile of exact e4m3 values
    latent = np.concatenate([values * 2.0 ** -3, values * 0.75])  # two tiles
    scales = np.array([2.0 ** -3, 0.75], dtype=np.float32)
    record = encode_latent_record(latent, [0.5] * 16, scale=scales)
    codes = [list(KNOWN_CODES)[i % len(KNOWN_CODES)] for i in range(128)] * 2
    assert np.array_equal(record, hand_record(codes, [2.0 ** -3, 0.75], [0.5] * 16))


@pytest.mark.parametrize("amax", [0.0, 1e-6, 0.03, 0.0448, 1.0, 300.0])
def test_scale_rules_follow_the_writers_formulas(amax):
    pow2_ceil = lambda x: 2.0 ** np.ceil(np.log2(np.float32(x)))  # noqa: E731 - the formula as the facts sheet writes it
    assert latent_tile_scale(amax, "ue8m0") == pow2_ceil(np.float32(max(amax, 1e-4)) * (np.float32(1) / np.float32(448)))
    assert latent_tile_scale(amax, "ue8m0_scale_floor") == pow2_ceil(max(np.float32(amax) / np.float32(448), np.float32(1e-4)))
    assert latent_tile_scale(amax, "flt_min") == max(np.float32(amax) / np.float32(448), np.finfo(np.float32).tiny)
    if amax == 0:
        with pytest.raises(NumericError, match="all-zero tile"):
            latent_tile_scale(amax, "amax")
    else:
        assert latent_tile_scale(amax, "amax") == np.float32(amax) / np.float32(448)


def test_small_tiles_get_2_to_the_minus_13_under_flashmla_s_floor():
    assert latent_tile_scale(0.01, "ue8m0_scale_floor") == 2.0 ** -13
    assert latent_tile_scale(0.01, "ue8m0") == 2.0 ** -15  # 0.01 / 448 = 2.2e-5 <= 2^-15


def test_the_ue8m0_rule_is_deepseek_s_act_quant():
    latent = np.random.default_rng(0).standard_normal((3, 256)) * [[0.01], [1.0], [100.0]]
    codes, scale = act_quant(latent, scale_fmt="ue8m0")
    record = encode_latent_record(latent, np.zeros((3, 8)))
    assert np.array_equal(record[:, :256], codes)
    assert np.array_equal(record[:, 256:264].copy().view("<f4"), scale)


def test_round_trip_error_is_half_an_e4m3_step_and_rope_is_bf16():
    rng = np.random.default_rng(1)
    latent, rope = rng.standard_normal((5, 256)) * 3.0, rng.standard_normal((5, 16))
    latent[2, 128:] = 0.0  # an all-zero tile
    rows = decode_latent_record(encode_latent_record(latent, rope, "flt_min"), 256, 16)
    tile_amax = np.repeat(np.abs(latent).reshape(5, 2, 128).max(axis=-1), 128, axis=1)
    assert np.all(np.abs(rows[:, :256] - latent) <= 2.0 ** -4 * tile_amax + 2.0 ** -10 * tile_amax / 448)
    assert np.all(rows[2, 128:256] == 0.0)
    bf16 = np.array([struct.unpack("<f", b"\0\0" + struct.pack("<f", v)[2:])[0] for v in rope.ravel()])  # truncation bounds
    assert np.all(np.abs(rows[:, 256:].ravel() - rope.ravel()) <= np.abs(rope.ravel() - bf16) + 1e-300)


def test_an_explicit_scale_too_small_saturates_at_448():
    latent = np.zeros(128)
    latent[:3] = [1.0, 0.5, -2.0]
    rows = decode_latent_record(encode_latent_record(latent, np.zeros(0), scale=np.array([2.0 ** -8])), 128, 0)
    assert rows[:3].tolist() == [1.0, 0.5, -448 * 2.0 ** -8]  # 2 / 2^-8 = 512 > 448


def test_tiny_configs_must_hold_whole_tiles():
    with pytest.raises(ShapeError, match=r"kv_lora_rank.*multiple of 128.*got 32.*FP8.12"):
        Fp8LatentCache.empty(load_preset("tiny"), batch=1)
    with pytest.raises(ShapeError, match=r"records.*expected \[\.\.\., 164\].*FP8.11"):
        decode_latent_record(np.zeros((2, 165), np.uint8), 128, 16)
    with pytest.raises(ShapeError, match="uint8 fp8 codes"):
        decode_latent_record(np.zeros((2, 164)), 128, 16)


CONFIG = load_preset("tiny").replace(kv_lora_rank=128)  # records of 128 + 4 + 2 x 16 = 164 bytes


def test_the_fp8_cache_holds_the_records_of_the_rows_and_reads_them_back():
    weights = generate_attention_weights(CONFIG, 0)
    hidden = np.random.default_rng(2).standard_normal((2, 4, CONFIG.hidden_size))
    exact = mla_forward(CONFIG, weights, hidden, cache=LatentCache.empty(CONFIG, 2), query_lengths=[4, 2])
    fp8 = mla_forward(CONFIG, weights, hidden, cache=Fp8LatentCache.empty(CONFIG, 2, scale_rule="amax"), query_lengths=[4, 2])
    rows = exact.cache.key_rows()
    assert fp8.cache.store.rows.dtype == np.uint8 and fp8.cache.store.rows.shape[-1] == 164
    assert np.array_equal(fp8.cache.key_rows()[0], decode_latent_record(encode_latent_record(rows[0, :, :128], rows[0, :, 128:], "amax"), 128, 16))
    assert np.array_equal(fp8.cache.store.key_rows()[1, 2:], np.zeros((2, 164), np.uint8))  # padding never written
    step = mla_forward(CONFIG, weights, hidden[:, :1], cache=fp8.cache)  # decode reads the dequantised rows
    assert step.cache.lengths.tolist() == [5, 3] and fp8.cache.lengths.tolist() == [4, 2]
    relative = np.linalg.norm(fp8.output - exact.output) / np.linalg.norm(exact.output)
    assert 0 < relative < 0.1  # the quantisation is part of the model: close to the float cache, never equal


def test_the_fp8_cache_refuses_another_config():
    cache = Fp8LatentCache.empty(CONFIG, 1)
    with pytest.raises(CacheError, match="another config"):
        cache.check(CONFIG.replace(kv_lora_rank=256), 1)


def _paged(rows: np.ndarray, block_size: int):
    """rows [batch, keys, width] into a pool whose unused slots hold 0x7F bytes (NaN codes, NaN scales, NaN rope)."""
    batch, keys, width = rows.shape
    per_sequence = -(-keys // block_size)
    pool = np.full((batch * per_sequence + 1, block_size, 1, width), 0x7F, rows.dtype) if rows.dtype == np.uint8 else \
        np.full((batch * per_sequence + 1, block_size, 1, width), np.nan)
    table = np.arange(batch * per_sequence)[::-1].reshape(batch, per_sequence)
    for b in range(batch):
        for t in range(keys):
            pool[table[b, t // block_size], t % block_size, 0] = rows[b, t]
    return pool, table


def test_the_kernel_reads_a_record_cache_as_its_decoded_rows():
    rng = np.random.default_rng(3)
    latent, rope = rng.standard_normal((2, 7, 128)), rng.standard_normal((2, 7, 16))
    records = encode_latent_record(latent, rope, "flt_min")  # [2, 7, 164]
    q = rng.standard_normal((2, 1, 3, 144))
    seqlens = np.array([7, 4])
    fp8_pool, table = _paged(records, 4)
    float_pool, _ = _paged(decode_latent_record(records, 128, 16), 4)
    out, lse = latent_attention_core(q, fp8_pool, table, seqlens, 128, 0.1)
    float_out, float_lse = latent_attention_core(q, float_pool, table, seqlens, 128, 0.1)
    assert np.array_equal(out, float_out) and np.array_equal(lse, float_lse)


def test_the_kernel_names_a_bad_record_cache():
    q = np.zeros((1, 1, 2, 144))
    table, seqlens = np.zeros((1, 1), np.int64), np.array([1])
    with pytest.raises(ShapeError, match=r"k_cache.*\[num_blocks, block_size, 1, 164\].*got \[1, 4, 1, 144\].*FP8.12"):
        latent_attention_core(q, np.zeros((1, 4, 1, 144), np.uint8), table, seqlens, 128, 0.1)
    with pytest.raises(ShapeError, match=r"head_dim_v.*multiple of 128.*got 100.*FP8.12"):
        latent_attention_core(q, np.zeros((1, 4, 1, 164), np.uint8), table, seqlens, 100, 0.1)
    pool = np.full((1, 4, 1, 164), 0x7F, np.uint8)  # a held slot of NaN codes
    with pytest.raises(InputError, match="not finite"):
        latent_attention_core(q, pool, table, seqlens, 128, 0.1)


@functools.lru_cache(maxsize=None)
def golden_manifest() -> dict:
    from mla_ref.golden.generate import default_golden_dir
    from mla_ref.golden.manifest import read_manifest

    return read_manifest(default_golden_dir() / "manifest.yaml")


def golden_case(case_id: str) -> dict:
    """One committed golden case's stored arrays (``input``, ``output``, ...)."""
    from mla_ref.conformance.check import load_case
    from mla_ref.golden.generate import default_golden_dir

    return load_case(default_golden_dir(), golden_manifest()["cases"][case_id])


def test_the_golden_fp8_case_holds_what_its_purpose_says():
    """GC-FP8 latent cache: power-of-two and other scales, an all-zero tile, saturated codes, NaN bytes in unused slots."""
    from mla_ref.cache import gather_paged_rows
    from mla_ref.fp8_cache import record_scales

    inputs = golden_case("mla.core.fp8/tiny-r512/bs16-seed0")["input"]
    k_cache, seqlens = inputs["k_cache"], inputs["cache_seqlens"]
    assert k_cache.dtype == np.uint8 and k_cache.shape[-1] == 656
    records = gather_paged_rows(k_cache, inputs["block_table"], seqlens)
    held = records[np.arange(records.shape[1])[None, :] < seqlens[:, None]]  # [keys held, 656]
    scales = record_scales(held, 512)
    powers_of_two = np.frexp(scales)[0] == 0.5
    assert powers_of_two.any() and (~powers_of_two).any()
    tiles = held[:, :512].reshape(-1, 4, 128)
    assert ((tiles & 0x7F) == 0).all(axis=-1).any()  # an all-zero tile
    assert ((tiles & 0x7F) == 0x7E).sum(axis=-1).max() > 1  # amax / 448 gives one code of 448 per tile; saturation more
    slots = k_cache.shape[0] * k_cache.shape[1]
    assert (k_cache == 0x7F).all(axis=-1).sum() == slots - held.shape[0] - len(seqlens)  # every slot but the held and the canaries


def test_the_golden_fp8_writer_case_holds_what_its_purpose_says():
    """GC-FP8 latent cache writer: explicit scales under which values reach 448..464 x scale and past 464 x scale, an
    all-zero tile, subnormal and -0 codes; the stored records carry the given scales and rope values byte for byte."""
    case = golden_case("fp8.cache.write/tiny-r512/seed0")
    rows, scales, records = case["input"]["rows"], case["input"]["scales"], case["output"]["records"]
    assert scales.dtype == np.float32 and records.dtype == np.uint8 and records.shape == (len(rows), 656)
    ratio = np.abs(rows[:, :512].astype(np.float32).reshape(len(rows), 4, 128) / scales[..., None]).max(axis=-1)  # [tokens, tiles]
    assert ((ratio > 448) & (ratio <= 464)).any() and (ratio > 464).any() and (ratio == 0).any() and ((ratio > 0) & (ratio <= 2.0 ** -5)).any()
    codes = records[:, :512]
    assert (codes == 0x80).any() and ((codes & 0x78) == 0).any() and not ((codes & 0x7F) == 0x7F).any()  # -0, subnormals, no NaN
    assert ((codes & 0x7F) == 0x7E).sum() > len(rows)  # saturation: more codes of 448 than one per amax / 448 tile
    for token in range(len(rows)):
        expected = struct.pack("<4f", *scales[token]) + b"".join(struct.pack("<f", value)[2:] for value in rows[token, 512:])
        assert records[token, 512:].tobytes() == expected
