"""FP8 — e4m3 formats, block quantisation and the FP8 GEMM, one function per step of spec/fp8.yaml.

FP8 tensors are uint8 arrays of codes (the bytes a checkpoint stores); :func:`decode_fp8` turns
them into float64 exactly, :func:`encode_fp8` rounds floats to codes on the format's grid. The
block steps follow DeepSeek's checkpoints (128 x 128 weight blocks, ``weight_scale_inv``
multiplied in) and kernels (1 x 128 activation groups, per-K-block fp32 promotion).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import InputError, ShapeError
from .precision import matmul, round_bf16

BLOCK_SIZE = 128
AMAX_FLOOR = 1e-4
OVERFLOW_MODES = ("saturate", "nan")
SCALE_FORMATS = (None, "ue8m0")
ACT_QUANT_VARIANTS = ("v32", "v3")
GEMM_IMPLS = ("fp8", "bf16")
MANTISSA_BITS = 3


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """An e4m3 format: exponent bias, largest finite value, NaN codes, whether -0 exists."""

    name: str
    exponent_bias: int
    max_finite: float
    nan_codes: tuple[int, ...]
    negative_zero: bool

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.exponent_bias)

    @property
    def subnormal_step(self) -> float:
        return 2.0 ** (1 - self.exponent_bias - MANTISSA_BITS)


FORMATS = {
    "e4m3fn": Fp8Format("e4m3fn", 7, 448.0, (0x7F, 0xFF), True),
    "e4m3fnuz": Fp8Format("e4m3fnuz", 8, 240.0, (0x80,), False),
}


def fp8_format(name: str, spec_id: str) -> Fp8Format:
    if name not in FORMATS:
        raise InputError("fmt", f"expected one of {sorted(FORMATS)}, got {name!r}", spec_id)
    return FORMATS[name]


def check_codes(codes, name: str, spec_id: str) -> np.ndarray:
    """``codes`` as a uint8 array; a float array is refused (it may hold values that are no e4m3 value)."""
    array = np.asarray(codes)
    if array.dtype != np.uint8:
        raise ShapeError(name, f"expected uint8 fp8 codes, got dtype {array.dtype}", spec_id)
    return array


def decode_fp8(codes, fmt: str = "e4m3fn") -> np.ndarray:
    """FP8.1 — uint8 codes to float64 values, exactly (OFP8 rev 1.0; e4m3fnuz: bias 8, NaN 0x80)."""
    form = fp8_format(fmt, "FP8.1")
    code = check_codes(codes, "codes", "FP8.1").astype(np.int64)
    exponent_field = (code >> MANTISSA_BITS) & 0xF
    mantissa = code & 0x7
    magnitude = np.where(exponent_field == 0,
                         mantissa * form.subnormal_step,
                         np.ldexp((8 + mantissa).astype(np.float64), exponent_field - form.exponent_bias - MANTISSA_BITS))
    values = np.where(code >> 7 == 1, -magnitude, magnitude)
    values[np.isin(code, form.nan_codes)] = np.nan
    return values


def encode_fp8(x, fmt: str = "e4m3fn", overflow: str = "saturate") -> np.ndarray:
    """FP8.2 — float to uint8 codes: via float32, round-to-nearest-even incl. subnormals (PT c10 Float8_e4m3fn.h; MLD)."""
    form = fp8_format(fmt, "FP8.2")
    if overflow not in OVERFLOW_MODES:
        raise InputError("overflow", f"expected one of {list(OVERFLOW_MODES)}, got {overflow!r}", "FP8.2")
    with np.errstate(over="ignore"):
        single = np.asarray(x, dtype=np.float32)
    negative = np.signbit(single)
    magnitude = np.abs(single).astype(np.float64)  # exact
    if overflow == "saturate":
        magnitude = np.minimum(magnitude, form.max_finite)  # NaN stays NaN
    is_nan = np.isnan(magnitude) | np.isinf(magnitude)  # inf is left only with overflow="nan"
    magnitude = np.where(is_nan, 0.0, magnitude)
    # the grid step at the value: 2^(exponent - 3) for normals, the subnormal step below the smallest normal
    _, exponent = np.frexp(np.maximum(magnitude, form.min_normal))  # magnitude in [2^(exponent-1), 2^exponent)
    step = np.ldexp(1.0, exponent - 1 - MANTISSA_BITS)
    rounded = np.rint(magnitude / step) * step  # exact: a float32 divided by a power of two; rint ties to even
    is_nan |= rounded > form.max_finite
    _, rounded_exponent = np.frexp(np.maximum(rounded, form.min_normal))
    exponent_field = np.where(rounded >= form.min_normal, rounded_exponent - 1 + form.exponent_bias, 0)
    unit = np.ldexp(1.0, rounded_exponent - 1 - MANTISSA_BITS)  # the subnormal step when exponent_field == 0
    mantissa = (rounded / unit).astype(np.int64) - np.where(exponent_field == 0, 0, 8)  # 8: the implicit leading bit
    code = (exponent_field << MANTISSA_BITS) | mantissa
    sign_bit = negative & ((code != 0) | form.negative_zero)  # e4m3fnuz has no -0: a negative zero is 0x00
    code = code | np.where(sign_bit, 0x80, 0)
    nan_code = np.where(negative, form.nan_codes[-1], form.nan_codes[0])
    return np.where(is_nan, nan_code, code).astype(np.uint8)


def ue8m0_scale(scale) -> np.ndarray:
    """FP8.3 — a positive float32 scale rounded UP to a power of two from its bits (EXP fast_log2_ceil; DG ceil_to_ue8m0)."""
    single = np.asarray(scale, dtype=np.float32)
    if not (np.all(single > 0) and np.all(np.isfinite(single))):
        raise InputError("scale", "expected finite positive float32 scales", "FP8.3")
    bits = np.ascontiguousarray(single).reshape(-1).view(np.uint32)  # 1-D, so that a 0-d input stays an array
    biased_exponent = (bits >> np.uint32(23)) + ((bits & np.uint32(0x7FFFFF)) != 0).astype(np.uint32)
    return (biased_exponent << np.uint32(23)).view(np.float32).reshape(single.shape)


def block_grid_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[ceil(d / 128) for d in shape]``: one scale per 128-block, edge blocks included."""
    return tuple(-(-dim // BLOCK_SIZE) for dim in shape)


def expand_block_scales(scale: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A [ceil(rows / 128), ceil(columns / 128)] scale grid repeated over its blocks, cut to [rows, columns]."""
    return np.repeat(np.repeat(scale, BLOCK_SIZE, axis=0), BLOCK_SIZE, axis=1)[:rows, :columns]


def check_scale(scale, expected: tuple[int, ...], name: str, spec_id: str) -> np.ndarray:
    """``scale`` as float32 of shape ``expected``, finite and positive."""
    array = np.asarray(scale)
    if array.shape != expected:
        raise ShapeError(name, f"expected shape {list(expected)}, got {list(array.shape)}", spec_id)
    if array.dtype.kind != "f":
        raise ShapeError(name, f"expected float32 scales, got dtype {array.dtype}", spec_id)
    if not (np.all(np.isfinite(array)) and np.all(array > 0)):
        raise InputError(name, "expected finite positive scales", spec_id)
    return array.astype(np.float32)


def weight_dequant(weight, weight_scale_inv) -> np.ndarray:
    """FP8.4 — ``W[i, j] = decode(W8[i, j]) * weight_scale_inv[i // 128, j // 128]``, edge blocks included (V3 README_WEIGHTS)."""
    codes = check_codes(weight, "weight", "FP8.4")
    if codes.ndim != 2:
        raise ShapeError("weight", f"expected [M, N], got {list(codes.shape)}", "FP8.4")
    rows, columns = codes.shape
    scale = check_scale(weight_scale_inv, block_grid_shape(codes.shape), "weight_scale_inv", "FP8.4")
    return decode_fp8(codes) * expand_block_scales(scale.astype(np.float64), rows, columns)  # [M, N], exact


def check_scale_fmt(scale_fmt, spec_id: str) -> None:
    if scale_fmt not in SCALE_FORMATS:
        raise InputError("scale_fmt", f"expected one of {list(SCALE_FORMATS)}, got {scale_fmt!r}", spec_id)


def weight_quant(weight, scale_fmt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FP8.5 — 128 x 128 block quantisation: ``s = max(amax, 1e-4) / 448`` per block, codes of ``w / s`` (V3 README_WEIGHTS)."""
    check_scale_fmt(scale_fmt, "FP8.5")
    values = np.asarray(weight, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ShapeError("weight", f"expected a non-empty [M, N], got {list(values.shape)}", "FP8.5")
    if not np.all(np.isfinite(values)):
        raise InputError("weight", "expected finite values", "FP8.5")
    rows, columns = values.shape
    row_blocks, column_blocks = block_grid_shape(values.shape)
    padded = np.zeros((row_blocks * BLOCK_SIZE, column_blocks * BLOCK_SIZE))
    padded[:rows, :columns] = np.abs(values)
    blocks = padded.reshape(row_blocks, BLOCK_SIZE, column_blocks, BLOCK_SIZE)
    amax = np.maximum(blocks.max(axis=(1, 3)).astype(np.float32), np.float32(AMAX_FLOOR))  # [row_blocks, column_blocks]
    scale = amax / np.float32(FORMATS["e4m3fn"].max_finite)
    if scale_fmt == "ue8m0":
        scale = ue8m0_scale(scale)
    scaled = values.astype(np.float32) / expand_block_scales(scale, rows, columns)  # [M, N] float32
    return encode_fp8(scaled), scale


def act_quant(x, scale_fmt: str | None = None, variant: str = "v32") -> tuple[np.ndarray, np.ndarray]:
    """FP8.6 — 1 x 128 activation quantisation along the last dimension, float32 (EXP / V3 kernel.py act_quant)."""
    check_scale_fmt(scale_fmt, "FP8.6")
    if variant not in ACT_QUANT_VARIANTS:
        raise InputError("variant", f"expected one of {list(ACT_QUANT_VARIANTS)}, got {variant!r}", "FP8.6")
    single = np.asarray(x, dtype=np.float32)
    if single.ndim == 0 or single.shape[-1] % BLOCK_SIZE or single.shape[-1] == 0:
        raise ShapeError("x", f"expected [..., N] with N a positive multiple of {BLOCK_SIZE}, got {list(single.shape)}", "FP8.6")
    if not np.all(np.isfinite(single)):
        raise InputError("x", "expected finite float32 values", "FP8.6")
    groups = single.reshape(single.shape[:-1] + (-1, BLOCK_SIZE))  # [..., N / 128, 128]
    amax = np.maximum(np.abs(groups).max(axis=-1), np.float32(AMAX_FLOOR))  # [..., N / 128]
    max_finite = np.float32(FORMATS["e4m3fn"].max_finite)
    if variant == "v32":
        scale = amax * (np.float32(1) / max_finite)
    else:
        scale = amax / max_finite
    if scale_fmt == "ue8m0":
        scale = ue8m0_scale(scale)
    scaled = np.clip(groups / scale[..., None], -max_finite, max_finite)  # float32
    return encode_fp8(scaled.reshape(single.shape)), scale


def fp8_gemm(a, a_scale, b, b_scale) -> np.ndarray:
    """FP8.7 — ``y = a @ b.T`` per 128-wide K block in fp32, scaled by a_s * b_s, output bf16 (EXP kernel.py fp8_gemm)."""
    a_codes = check_codes(a, "a", "FP8.7")
    b_codes = check_codes(b, "b", "FP8.7")
    if a_codes.ndim != 2 or b_codes.ndim != 2 or a_codes.shape[1] != b_codes.shape[1]:
        raise ShapeError("a, b", f"expected [M, K] and [N, K], got {list(a_codes.shape)} and {list(b_codes.shape)}", "FP8.7")
    rows, depth = a_codes.shape
    columns = b_codes.shape[0]
    k_blocks = block_grid_shape((depth,))[0]
    a_scale = check_scale(a_scale, (rows, k_blocks), "a_scale", "FP8.7")
    b_scale = check_scale(b_scale, block_grid_shape((columns, depth)), "b_scale", "FP8.7")
    b_scale_per_row = np.repeat(b_scale, BLOCK_SIZE, axis=0)[:columns]  # [N, k_blocks]
    a_values, b_values = decode_fp8(a_codes), decode_fp8(b_codes)
    accumulator = np.zeros((rows, columns), dtype=np.float32)
    for block in range(k_blocks):
        k = slice(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE)
        partial = (a_values[:, k] @ b_values[:, k].T).astype(np.float32)  # [M, N], the float64 sum is exact
        block_scale = a_scale[:, block, None] * b_scale_per_row[None, :, block]  # [M, N] float32
        accumulator += partial * block_scale
    return round_bf16(accumulator)


def fp8_linear(x, weight, weight_scale_inv, gemm_impl: str = "fp8", scale_fmt: str | None = None,
               act_variant: str = "v32") -> np.ndarray:
    """FP8.8 — ``y = x @ W.T`` for an FP8 weight: act_quant + fp8_gemm, or the V3 demo's bf16 dequantisation (EXP model.py:159-163)."""
    if gemm_impl not in GEMM_IMPLS:
        raise InputError("gemm_impl", f"expected one of {list(GEMM_IMPLS)}, got {gemm_impl!r}", "FP8.8")
    values = np.asarray(x, dtype=np.float64)
    if values.ndim == 0:
        raise ShapeError("x", "expected [..., K], got a scalar", "FP8.8")
    leading = values.shape[:-1]
    rows = values.reshape(-1, values.shape[-1])  # [tokens, K]
    if gemm_impl == "bf16":
        weight_bf16 = round_bf16(weight_dequant(weight, weight_scale_inv))  # [N, K]
        if weight_bf16.shape[1] != rows.shape[1]:
            raise ShapeError("x", f"expected [..., {weight_bf16.shape[1]}], got {list(values.shape)}", "FP8.8")
        y = round_bf16(round_bf16(rows) @ weight_bf16.T)  # [tokens, N]
    else:
        codes, scale = act_quant(rows, scale_fmt, act_variant)
        y = fp8_gemm(codes, scale, weight, weight_scale_inv)  # [tokens, N]
    return y.reshape(leading + (y.shape[-1],))


@dataclasses.dataclass(frozen=True)
class Fp8Linear:
    """FP8.13 — an FP8 weight as the ``fp8`` profile's emulation runs it: the checkpoint's codes and scales, the
    dequantised values (FP8.4) and the engine's choices (``fp8_linear`` of spec/tolerance.yaml)."""

    codes: np.ndarray  # [N, K] uint8 e4m3fn
    weight_scale_inv: np.ndarray  # [ceil(N / 128), ceil(K / 128)] float32
    gemm_impl: str = "fp8"
    scale_fmt: str | None = None
    act_variant: str = "v32"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def dense(self) -> np.ndarray:
        """The weight as the engines that dequantise it hold it: bf16 of FP8.4 (V3 weight_dequant for the absorbed kv_b_proj)."""
        return round_bf16(weight_dequant(self.codes, self.weight_scale_inv))


def linear(x: np.ndarray, weight) -> np.ndarray:
    """FP8.13 — ``x @ W.T`` of a linear layer: FP8.8 for an :class:`Fp8Linear` (the fp8 profile's emulation), else the product."""
    if isinstance(weight, Fp8Linear):
        return fp8_linear(x, weight.codes, weight.weight_scale_inv, weight.gemm_impl, weight.scale_fmt, weight.act_variant)
    return matmul(x, weight.T)


def dense(weight) -> np.ndarray:
    """FP8.13 — a weight as an array: :meth:`Fp8Linear.dense` for an FP8 weight, else the array itself."""
    return weight.dense() if isinstance(weight, Fp8Linear) else weight
