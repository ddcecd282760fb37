"""ROPE — decoupled RoPE with DeepSeek YaRN (spec/rope.yaml).

Two layouts pair the rotated dims: ``interleaved`` (2j, 2j+1), the canonical one the
released checkpoints use, and ``half`` (j, j + d/2), reproduced exactly from the
canonical model by permuting weight rows with :func:`half_layout_permutation`.
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .errors import InputError


def _library_call(function, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``function(x)`` correctly rounded to ``dtype``: evaluated in float64, rounded once.

    In float32 this stands for an engine's float32 ``pow`` / ``cos`` / ``sin`` (within 1 ulp of
    it) and gives the same bits on every machine, whatever SIMD path NumPy's own float32
    functions take.
    """
    return function(np.asarray(x, dtype=np.float64)).astype(dtype, copy=False)


def base_inverse_frequencies(config: ModelConfig, dtype=np.float64) -> np.ndarray:
    """ROPE.1 — ``theta^(-2j/d)`` for j < d/2 (RoFormer), as ``1 / theta^(2j/d)`` in ``dtype``.

    float32 builds it as the engines do (OFF ``precompute_freqs_cis``, HF, vLLM): exponent,
    power and reciprocal each rounded to float32.
    """
    dtype = np.dtype(dtype)
    exponents = np.arange(0, config.qk_rope_head_dim, 2, dtype=dtype) / dtype.type(config.qk_rope_head_dim)
    theta = float(dtype.type(config.rope_theta))
    return dtype.type(1.0) / _library_call(lambda e: theta ** e, exponents, dtype)  # [rope_half]


def _correction_dim(config: ModelConfig, rotations: float) -> float:
    """The dim whose wavelength fits ``rotations`` times into the original context."""
    dim = config.qk_rope_head_dim
    ratio = config.original_max_position_embeddings / (2 * math.pi * rotations)
    return dim * math.log(ratio) / (2 * math.log(config.rope_theta))


def yarn_correction_range(config: ModelConfig) -> tuple[float, float]:
    """ROPE.2 — (low, high) dims of the YaRN ramp; (10, 23) for V3.

    ``high`` is clamped to ``d - 1`` (not ``d/2 - 1``), as in every public implementation.
    """
    low = _correction_dim(config, config.beta_fast)
    high = _correction_dim(config, config.beta_slow)
    if config.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, config.qk_rope_head_dim - 1)


def yarn_ramp(config: ModelConfig, dtype=np.float64) -> np.ndarray:
    """ROPE.3 (part) — interpolation weight per dim: 0 keeps the frequency, 1 divides it by s (in ``dtype``)."""
    dtype = np.dtype(dtype)
    low, high = yarn_correction_range(config)
    if high == low:
        high += 0.001
    dims = np.arange(config.qk_rope_head_dim // 2, dtype=dtype)
    return np.clip((dims - dtype.type(low)) / dtype.type(high - low), dtype.type(0.0), dtype.type(1.0))  # [rope_half]


def rope_frequencies(config: ModelConfig, dtype=np.float64) -> np.ndarray:
    """ROPE.3 — the angular frequencies, blended by the YaRN ramp when YaRN is active (every operation in ``dtype``)."""
    dtype = np.dtype(dtype)
    inv_freq = base_inverse_frequencies(config, dtype)
    if not config.yarn_active:
        return inv_freq
    ramp = yarn_ramp(config, dtype)
    return inv_freq / dtype.type(config.rope_factor) * ramp + inv_freq * (dtype.type(1.0) - ramp)  # [rope_half]


def yarn_get_mscale(scale: float, mscale: float) -> float:
    """YaRN magnitude ``0.1 * mscale * ln(scale) + 1`` (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: ModelConfig) -> float:
    """ROPE.4 — ``qk_head_dim^-0.5 * m^2`` with m from mscale_all_dim (V3: 0.1352337788608801)."""
    m = yarn_get_mscale(config.rope_factor, config.mscale_all_dim) if config.yarn_active else 1.0
    return config.qk_head_dim ** -0.5 * m * m


def rope_amplitude(config: ModelConfig) -> float:
    """ROPE.4 — cos/sin amplitude ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` (1 when equal)."""
    if not config.yarn_active:
        return 1.0
    return yarn_get_mscale(config.rope_factor, config.mscale) / yarn_get_mscale(config.rope_factor, config.mscale_all_dim)


def rope_angles(config: ModelConfig, positions: np.ndarray, dtype=np.float64,
                table_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """ROPE.5 — cos and sin (times the amplitude) of ``position * freq``, returned in ``dtype``.

    ``table_dtype`` is the precision the table is built in: float64 for the truth; float32 the
    way every public engine builds it (frequencies, positions, the product ``position * freq``,
    cos / sin and the amplitude's product in float32: TOLERANCE.2 ``rope_table``), which moves
    an angle by up to position x ulp(freq).
    """
    table_dtype = np.dtype(table_dtype)
    angles = np.asarray(positions).astype(table_dtype)[..., None] * rope_frequencies(config, table_dtype)  # [..., rope_half]
    amplitude = table_dtype.type(rope_amplitude(config))
    cos = amplitude * _library_call(np.cos, angles, table_dtype)
    sin = amplitude * _library_call(np.sin, angles, table_dtype)
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    """ROPE.6 — rotate pairs of ``x`` (V2R eq. 14-15); ``cos``/``sin`` broadcast over ``x[..., :d/2]``.

    interleaved: pair j is (x[2j], x[2j+1]); half: pair j is (x[j], x[j + d/2]).
    """
    half = x.shape[-1] // 2
    if layout == "interleaved":
        real, imag = x[..., 0::2], x[..., 1::2]  # [..., rope_half] each
    elif layout == "half":
        real, imag = x[..., :half], x[..., half:]
    else:
        raise InputError("rope_layout", f"expected 'interleaved' or 'half', got {layout!r}", "ROPE.6")
    rotated_real = real * cos - imag * sin
    rotated_imag = real * sin + imag * cos
    if layout == "interleaved":
        return np.stack([rotated_real, rotated_imag], axis=-1).reshape(x.shape)  # [..., d]
    return np.concatenate([rotated_real, rotated_imag], axis=-1)  # [..., d]


def half_layout_permutation(rope_dim: int) -> np.ndarray:
    """ROPE.7 — ``P = [0, 2, .., d-2, 1, 3, .., d-1]``: ``half(x[P]) == interleaved(x)[P]``."""
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
