"""FP8 latent cache records — FP8.9-FP8.11 of spec/fp8.yaml (the cache kind, FP8.12, lives in cache.py).

DeepSeek-V3.2's FP8 latent cache stores one 656-byte record per token (FlashMLA's FP8
decode, vLLM, SGLang): the 512 latent values as e4m3fn codes, one float32 scale per 128 of
them, then the 64 RoPE'd k_pe values as bf16, little-endian, in that order. A config's record
is ``kv_lora_rank + 4 * kv_lora_rank / 128 + 2 * qk_rope_head_dim`` bytes, so kv_lora_rank must
be a multiple of 128. Decoding is exact in float64: an e4m3 value times a float32 scale needs
at most 4 + 24 significant bits.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, NumericError, ShapeError
from .fp8 import AMAX_FLOOR, BLOCK_SIZE, FORMATS, check_codes, decode_fp8, encode_fp8, ue8m0_scale
from .precision import round_bf16

SCALE_RULES = ("ue8m0", "ue8m0_scale_floor", "amax", "flt_min")
SCALE_BYTES = 4  # float32, little-endian
ROPE_BYTES = 2  # bfloat16, little-endian
FLT_MIN = np.finfo(np.float32).tiny  # 2^-126
UE8M0_SCALE_FLOOR = 1e-4  # FlashMLA tests/quant.py: the floor on amax / 448, not on amax


def record_width(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """Bytes per token: the codes, one float32 scale per 128 codes, the bf16 rope values (656 for 512 + 64)."""
    return kv_lora_rank + SCALE_BYTES * (kv_lora_rank // BLOCK_SIZE) + ROPE_BYTES * qk_rope_head_dim


def check_record_dims(kv_lora_rank, qk_rope_head_dim, spec_id: str, rank_name: str = "kv_lora_rank") -> None:
    """A record holds whole 128-wide tiles: kv_lora_rank a positive multiple of 128, qk_rope_head_dim >= 0."""
    for name, value, least in ((rank_name, kv_lora_rank, 1), ("qk_rope_head_dim", qk_rope_head_dim, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ShapeError(name, f"expected an int >= {least}, got {value!r}", spec_id)
    if kv_lora_rank % BLOCK_SIZE:
        raise ShapeError(rank_name, f"expected a multiple of {BLOCK_SIZE} (one float32 scale per {BLOCK_SIZE} latent values "
                         f"in a cache record), got {kv_lora_rank}", spec_id)


def check_scale_rule(scale_rule, spec_id: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise InputError("scale_rule", f"expected one of {list(SCALE_RULES)}, got {scale_rule!r}", spec_id)


def latent_tile_scale(amax, scale_rule: str = "ue8m0") -> np.ndarray:
    """FP8.9 — the float32 dequantisation scale of a 128-wide latent tile from its amax, as each cache writer computes it.

    ``ue8m0``: DeepSeek's simulation (EXP model.py:569-571, act_quant with scale_fmt ue8m0);
    ``ue8m0_scale_floor``: FlashMLA tests/quant.py; ``amax``: FlashMLA tests @1408756 and SGLang
    (no floor: an all-zero tile is refused); ``flt_min``: vLLM concat_and_cache_ds_mla_kernel.
    """
    check_scale_rule(scale_rule, "FP8.9")
    single = np.asarray(amax, dtype=np.float32)
    if not (np.all(np.isfinite(single)) and np.all(single >= 0)):
        raise InputError("amax", "expected finite values >= 0", "FP8.9")
    max_finite = np.float32(FORMATS["e4m3fn"].max_finite)
    if scale_rule == "ue8m0":
        return ue8m0_scale(np.maximum(single, np.float32(AMAX_FLOOR)) * (np.float32(1) / max_finite))
    if scale_rule == "ue8m0_scale_floor":
        return ue8m0_scale(np.maximum(single / max_finite, np.float32(UE8M0_SCALE_FLOOR)))
    if scale_rule == "flt_min":
        return np.maximum(single / max_finite, FLT_MIN)
    if (single == 0).any():
        raise NumericError("amax", "scale_rule 'amax' has no floor: an all-zero tile gets scale 0 and its values 0 / 0 = NaN "
                           "(FlashMLA tests @1408756, SGLang); use a rule with a floor (ue8m0, ue8m0_scale_floor, flt_min)", "FP8.9")
    return single / max_finite


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """The uint16 bit patterns of ``values`` rounded to bfloat16 (nearest-even, via float32)."""
    return (round_bf16(values).astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def encode_latent_record(kv_latent, k_pe, scale_rule: str = "ue8m0", scale=None) -> np.ndarray:
    """FP8.10 — ``[latent | k_pe]`` to records: e4m3fn codes of latent / scale per 128, the float32 scales, bf16 k_pe (FM README; VL).

    ``kv_latent [..., kv_lora_rank]``, ``k_pe [..., qk_rope_head_dim]``; ``scale [..., kv_lora_rank / 128]``
    explicit scales (else FP8.9 with ``scale_rule``). Returns uint8 ``[..., record_width]``.
    """
    latent = np.asarray(kv_latent, dtype=np.float32)
    rope = np.asarray(k_pe, dtype=np.float64)
    if latent.ndim == 0 or rope.shape[:-1] != latent.shape[:-1]:
        raise ShapeError("k_pe", f"expected the leading dims of kv_latent {list(latent.shape[:-1])}, got {list(rope.shape)}", "FP8.10")
    rank, rope_dim = latent.shape[-1], rope.shape[-1]
    check_record_dims(rank, rope_dim, "FP8.10")
    for name, values in (("kv_latent", latent), ("k_pe", rope)):
        if not np.all(np.isfinite(values)):
            raise InputError(name, "expected finite values", "FP8.10")
    tiles = latent.reshape(latent.shape[:-1] + (rank // BLOCK_SIZE, BLOCK_SIZE))  # [..., tiles, 128]
    if scale is None:
        scale = latent_tile_scale(np.abs(tiles).max(axis=-1), scale_rule)  # [..., tiles]
    else:
        scale = np.asarray(scale)
        if scale.shape != tiles.shape[:-1] or scale.dtype.kind != "f":
            raise ShapeError("scale", f"expected float scales of shape {list(tiles.shape[:-1])}, got {scale.dtype} {list(scale.shape)}", "FP8.10")
        scale = scale.astype(np.float32)
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise InputError("scale", "expected finite float32 scales > 0", "FP8.10")
    max_finite = np.float32(FORMATS["e4m3fn"].max_finite)
    codes = encode_fp8(np.clip(tiles / scale[..., None], -max_finite, max_finite))  # [..., tiles, 128], float32 division
    records = np.concatenate([codes.reshape(latent.shape),
                              scale.astype("<f4").view(np.uint8).reshape(latent.shape[:-1] + (-1,)),
                              bf16_bits(rope).astype("<u2").view(np.uint8).reshape(latent.shape[:-1] + (-1,))], axis=-1)
    return records  # [..., record_width]


def record_scales(records: np.ndarray, kv_lora_rank: int) -> np.ndarray:
    """The float32 scales of records ``[..., width]``: bytes kv_lora_rank .. kv_lora_rank + 4 * tiles, little-endian."""
    tiles = kv_lora_rank // BLOCK_SIZE
    scale_bytes = np.ascontiguousarray(records[..., kv_lora_rank: kv_lora_rank + SCALE_BYTES * tiles])
    return scale_bytes.view("<f4").astype(np.float64)  # [..., tiles]


def record_rope(records: np.ndarray, kv_lora_rank: int) -> np.ndarray:
    """The bf16 k_pe of records ``[..., width]``: the bytes after the scales, little-endian, as float64 (exact)."""
    rope_bytes = np.ascontiguousarray(records[..., kv_lora_rank + SCALE_BYTES * (kv_lora_rank // BLOCK_SIZE):])
    return (rope_bytes.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)  # [..., rope]


def decode_latent_record(records, kv_lora_rank: int, qk_rope_head_dim: int) -> np.ndarray:
    """FP8.11 — records to rows ``[latent | k_pe]``: decode(code) * scale per 128-wide tile, then the bf16 k_pe (FM tests/quant.py).

    ``records [..., record_width]`` uint8; returns float64 ``[..., kv_lora_rank + qk_rope_head_dim]``, exact.
    """
    check_record_dims(kv_lora_rank, qk_rope_head_dim, "FP8.11")
    records = check_codes(records, "records", "FP8.11")
    width = record_width(kv_lora_rank, qk_rope_head_dim)
    if records.ndim == 0 or records.shape[-1] != width:
        raise ShapeError("records", f"expected [..., {width}] ({kv_lora_rank} e4m3 codes, {kv_lora_rank // BLOCK_SIZE} float32 "
                         f"scales, {qk_rope_head_dim} bf16 rope values), got {list(records.shape)}", "FP8.11")
    leading = records.shape[:-1]
    tiles = decode_fp8(records[..., :kv_lora_rank]).reshape(leading + (-1, BLOCK_SIZE))  # [..., tiles, 128]
    latent = (tiles * record_scales(records, kv_lora_rank)[..., None]).reshape(leading + (kv_lora_rank,))
    return np.concatenate([latent, record_rope(records, kv_lora_rank)], axis=-1)  # [..., kv_lora_rank + rope]


def check_latent_records(name: str, value, kv_lora_rank, qk_rope_head_dim, spec_id: str, rank_name: str = "kv_lora_rank") -> np.ndarray:
    """A paged cache of records ``[num_blocks, block_size, 1, record_width]`` uint8 (FlashMLA's FP8 ``k_cache``)."""
    check_record_dims(kv_lora_rank, qk_rope_head_dim, spec_id, rank_name)
    array = check_codes(value, name, spec_id)
    width = record_width(kv_lora_rank, qk_rope_head_dim)
    if array.ndim != 4 or array.shape[2] != 1 or array.shape[3] != width:
        raise ShapeError(name, f"expected uint8 records [num_blocks, block_size, 1, {width}] ({rank_name} {kv_lora_rank} + "
                         f"{SCALE_BYTES * (kv_lora_rank // BLOCK_SIZE)} scale bytes + {ROPE_BYTES} x {qk_rope_head_dim} rope bytes), "
                         f"got {list(array.shape)}", spec_id)
    return array
