"""TOLERANCE.1 — rounding emulation of low-precision storage (spec/tolerance.yaml).

Round-to-nearest-even to bfloat16, float16 and TF32 (10-bit mantissa), done on the
bits of float32 so that NumPy needs no extension type. Values come back as float64
(exactly representable), so an emulated pipeline keeps computing in float64 between
the rounding points its precision profile declares.
"""

from __future__ import annotations

import numpy as np


def _round_float32_mantissa(x: np.ndarray, dropped_bits: int) -> np.ndarray:
    """Round float32 values to ``23 - dropped_bits`` mantissa bits, nearest-even; NaN and inf pass through."""
    with np.errstate(over="ignore"):
        single = np.asarray(x, dtype=np.float32)
    flat = np.ascontiguousarray(single).reshape(-1)  # 1-D, so that a 0-d input stays an array
    bits = flat.view(np.uint32)
    # in place on one uint32 array (a weight of 10^8 values rounds in ~2 x its float64 size, not ~5 x):
    # a finite value's bits stay below 0xFF800000, so adding at most 2^dropped_bits cannot wrap
    rounded = bits >> np.uint32(dropped_bits)
    rounded &= np.uint32(1)  # the lowest kept bit: ties go to even
    rounded += np.uint32((1 << (dropped_bits - 1)) - 1)
    rounded += bits
    rounded &= np.uint32((0xFFFFFFFF >> dropped_bits) << dropped_bits)
    rounded_float = rounded.view(np.float32)
    np.copyto(rounded_float, flat, where=~np.isfinite(flat))  # NaN and inf pass through
    return rounded_float.astype(np.float64).reshape(single.shape)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """TOLERANCE.1 — to bfloat16 (8 exponent, 7 mantissa bits), via float32, nearest-even."""
    return _round_float32_mantissa(x, 16)


def round_tf32(x: np.ndarray) -> np.ndarray:
    """TOLERANCE.1 — to TF32 (float32 range, 10 mantissa bits), nearest-even."""
    return _round_float32_mantissa(x, 13)


def round_fp16(x: np.ndarray) -> np.ndarray:
    """TOLERANCE.1 — to IEEE float16 (NumPy's own cast rounds to nearest-even; overflow gives inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def round_fp32(x: np.ndarray) -> np.ndarray:
    """TOLERANCE.1 — to IEEE float32."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


ROUNDING = {"bf16": round_bf16, "fp16": round_fp16, "tf32": round_tf32, "fp32": round_fp32,
            "fp64": lambda x: np.asarray(x, dtype=np.float64)}

# Unit roundoff (half the distance from 1 to the next value) of each storage format.
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "tf32": 2.0 ** -11, "fp32": 2.0 ** -24, "fp64": 2.0 ** -53}
