"""TOLERANCE.1 — rounding emulation of low-precision storage; TOLERANCE.2's float32 products (spec/tolerance.yaml).

Round-to-nearest-even to bfloat16, float16 and TF32 (10-bit mantissa), done on the
bits of float32 so that NumPy needs no extension type. Values come back as float64
(exactly representable), so an emulated pipeline keeps computing in float64 between
the rounding points its precision profile declares. :func:`matmul`, :func:`exp` and
:func:`log` are the math modules' products and transcendentals: NumPy's own in float64, and
in float32 the arithmetic of TOLERANCE.2, the same on every machine.
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


# K per block of the float32 product (TOLERANCE.2): an sgemm kernel sums a block of K in registers, then adds it
# to C. Measured at K = 16384 (V3 o_proj): one chain along all of K errs 5.8 x more than OpenBLAS sgemm, blocks of
# 256 as much (3.2e-7 against 4.0e-7 relative).
K_BLOCK = 256


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TOLERANCE.2 — ``a @ b``; in float32, a fixed accumulation along K that no BLAS kernel or thread count changes.

    Float64 operands (the truth, bf16 / fp16 emulations) go to ``np.matmul``. Two float32
    operands ``[..., M, K] @ [..., K, N]`` are accumulated as a GEMM kernel does: each block
    of K_BLOCK consecutive k is one fused multiply-add chain from zero, in increasing k,
    ``acc = fl32(acc + a[.., k] * b[k, ..])`` (the product exact: a float32 product fits a
    float64; the sum formed in float64, then rounded to float32), and the blocks are added to
    the float32 total in order. BLAS sgemm would instead sum in the order of whichever kernel
    the machine picks (K blocking, FMA or not, threads), which moves every emulation by a few
    units. Vectorised over batch, M and N; the loop runs over K.
    """
    if a.dtype != np.float32 or b.dtype != np.float32:
        return np.matmul(a, b)
    a_columns = np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float64)  # [K, ..., M], one k contiguous
    b_rows = np.ascontiguousarray(np.moveaxis(b, -2, 0), dtype=np.float64)  # [K, ..., N]
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])  # [..., M, N]
    total = np.zeros(shape, np.float32)
    block = np.zeros(shape, np.float32)
    step = np.empty(shape, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf (and inf - inf NaN), as sgemm gives
        for k, (a_column, b_row) in enumerate(zip(a_columns, b_rows)):
            if k and k % K_BLOCK == 0:
                total += block  # float32 + float32: one rounding
                block[...] = 0.0
            np.multiply(a_column[..., :, None], b_row[..., None, :], out=step)  # exact products
            step += block
            block[...] = step  # one rounding to float32 per k
        total += block
    return total


def exp(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """TOLERANCE.2 — ``e^x``; float32 values through float64, rounded once (NumPy's float32 exp follows the CPU's SIMD)."""
    if x.dtype != np.float32:
        return np.exp(x, out=out)
    return np.exp(x, out=np.empty_like(x) if out is None else out, dtype=np.float64, casting="same_kind")


def log(x: np.ndarray) -> np.ndarray:
    """TOLERANCE.2 — natural log; float32 values through float64, rounded once, as :func:`exp`."""
    if x.dtype != np.float32:
        return np.log(x)
    return np.log(x, out=np.empty_like(x), dtype=np.float64, casting="same_kind")
