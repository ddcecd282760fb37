"""FP8 (spec/fp8.yaml): the e4m3 codecs against ml_dtypes on every code and every rounding boundary, and the
block steps against independent derivations (np.kron scale grids, float64 matmuls, bounds derived from the
float32 operations the kernels perform)."""

from __future__ import annotations

import numpy as np
import pytest

from mla_ref.errors import InputError, ShapeError
from mla_ref.fp8 import (FORMATS, act_quant, decode_fp8, encode_fp8, fp8_gemm, fp8_linear, ue8m0_scale, weight_dequant,
                         weight_quant)
from mla_ref.precision import round_bf16

ml_dtypes = pytest.importorskip("ml_dtypes")
ML_TYPES = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e4m3fnuz": ml_dtypes.float8_e4m3fnuz}
ALL_CODES = np.arange(256, dtype=np.uint8)
U32 = 2.0 ** -24
U_BF16 = 2.0 ** -8


def ml_encode(x, fmt):
    return np.asarray(x, dtype=np.float32).astype(ML_TYPES[fmt]).view(np.uint8)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_code_decodes_as_ml_dtypes(fmt):
    ours = decode_fp8(ALL_CODES, fmt)
    theirs = ALL_CODES.view(ML_TYPES[fmt]).astype(np.float64)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(ours)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.array_equal(np.signbit(ours[finite]), np.signbit(theirs[finite]))  # -0 is 0x80 in e4m3fn only
    assert set(ALL_CODES[~finite]) == set(FORMATS[fmt].nan_codes)
    assert np.nanmax(ours) == FORMATS[fmt].max_finite


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_code_round_trips(fmt):
    values = decode_fp8(ALL_CODES, fmt)
    finite = ~np.isnan(values)
    assert np.array_equal(encode_fp8(values[finite], fmt), ALL_CODES[finite])


def boundary_sweep(fmt: str, ulps: int = 48) -> np.ndarray:
    """float32 values within ``ulps`` steps of every finite value of the format, every midpoint between
    neighbours and the midpoint just past the maximum, both signs, with +-0, +-inf and NaN."""
    values = np.unique(np.abs(decode_fp8(ALL_CODES, fmt)[~np.isnan(decode_fp8(ALL_CODES, fmt))]))
    midpoints = (values[:-1] + values[1:]) / 2
    past_max = values[-1] + (values[-1] - values[-2]) * np.array([0.5, 1.0, 1.5])
    centres = np.concatenate([values, midpoints, past_max]).astype(np.float32)  # all exact in float32
    points = [centres]
    below, above = centres.copy(), centres.copy()
    for _ in range(ulps):
        below = np.nextafter(below, np.float32(-1))
        above = np.nextafter(above, np.float32(np.inf))
        points += [below, above]
    sweep = np.concatenate(points)
    return np.concatenate([sweep, -sweep, np.array([np.inf, -np.inf, np.nan], dtype=np.float32)])


def wide_random_floats(count: int = 200_000) -> np.ndarray:
    """Random float32 of both signs from far below the smallest subnormal to far above the maximum."""
    rng = np.random.default_rng(16)
    exponents = rng.integers(-16, 12, size=count)
    return (rng.uniform(-1, 1, size=count) * 2.0 ** exponents).astype(np.float32)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_encoding_matches_ml_dtypes_on_every_rounding_boundary(fmt):
    """ml_dtypes gives NaN for what rounds past the maximum: our overflow="nan"."""
    x = np.concatenate([boundary_sweep(fmt), wide_random_floats()])
    ours, theirs = encode_fp8(x, fmt, overflow="nan"), ml_encode(x, fmt)
    wrong = np.flatnonzero(ours != theirs)
    assert wrong.size == 0, f"{wrong.size} mismatches, first x={x[wrong[0]]!r}: ours {ours[wrong[0]]:#04x}, ml_dtypes {theirs[wrong[0]]:#04x}"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_saturating_encoding_is_the_clamped_cast(fmt):
    top = FORMATS[fmt].max_finite
    x = np.concatenate([boundary_sweep(fmt), wide_random_floats()])
    clamped = np.clip(x, -top, top)  # inf -> +-max, NaN stays
    assert np.array_equal(encode_fp8(x, fmt), ml_encode(clamped, fmt))
    assert np.array_equal(decode_fp8(encode_fp8([np.inf, -np.inf, 1e30, top * 1.07], fmt), fmt), [top, -top, top, top])


def test_torch_behaviours_on_overflow_as_the_facts_measured_them():
    """Facts B3: torch eager < 2.12 / ml_dtypes: 449..464 -> 448, 464.1..480, inf -> NaN; saturating casts: 448."""
    x = [449.0, 456.0, 463.9, 464.0, 464.1, 470.0, 479.0, 480.0, 500.0, np.inf]
    assert list(encode_fp8(x, overflow="nan")) == [0x7E] * 4 + [0x7F] * 6
    assert list(encode_fp8(x)) == [0x7E] * 10
    assert list(encode_fp8([-470.0, np.nan], overflow="nan")) == [0xFF, 0x7F]


def test_rounding_examples_of_the_facts_sheet():
    x = [1.0625, 1.1875, 2.0 ** -10, 1.5 * 2.0 ** -10, 1.5 * 2.0 ** -9, 2.5 * 2.0 ** -9, -0.0, -2.0 ** -11]
    assert list(decode_fp8(encode_fp8(x))) == [1.0, 1.25, 0.0, 2.0 ** -9, 2.0 ** -8, 2.0 ** -8, 0.0, 0.0]
    assert list(encode_fp8([-0.0, -2.0 ** -11])) == [0x80, 0x80]
    assert list(encode_fp8([-0.0, -2.0 ** -12], "e4m3fnuz")) == [0x00, 0x00]  # 0x80 would be NaN
    assert decode_fp8(encode_fp8([1.0625 + 2.0 ** -40]))[0] == 1.0  # through float32, not direct from float64


def test_fnuz_read_as_ocp_is_exactly_a_factor_two():
    finite = [code for code in ALL_CODES if code not in (0x7F, 0x80, 0xFF)]
    codes = np.array(finite, dtype=np.uint8)
    assert np.array_equal(decode_fp8(codes, "e4m3fn"), 2 * decode_fp8(codes, "e4m3fnuz"))
    assert np.isnan(decode_fp8(np.array([0x80], dtype=np.uint8), "e4m3fnuz")[0])


def test_codecs_refuse_floats_and_unknown_formats():
    with pytest.raises(ShapeError, match=r"codes: expected uint8 fp8 codes, got dtype float32 \(FP8.1\)"):
        decode_fp8(np.zeros(3, dtype=np.float32))
    with pytest.raises(InputError, match=r"fmt: .*'e5m2'.*FP8.2"):
        encode_fp8([1.0], "e5m2")
    with pytest.raises(InputError, match=r"overflow: .*FP8.2"):
        encode_fp8([1.0], overflow="wrap")


def test_ue8m0_rounds_the_exponent_up():
    rng = np.random.default_rng(3)
    scale = (rng.uniform(0.5, 1, 10_000) * 2.0 ** rng.integers(-30, 30, 10_000)).astype(np.float32)
    scale[:60] = 2.0 ** np.arange(-30, 30)  # exact powers stay
    assert np.array_equal(ue8m0_scale(scale), 2.0 ** np.ceil(np.log2(scale.astype(np.float64))))
    assert ue8m0_scale(np.float32(0.3)).shape == () and ue8m0_scale(np.float32(0.3)) == 0.5
    with pytest.raises(InputError, match="FP8.3"):
        ue8m0_scale([0.0])


KV_A_SHAPE = (576, 7168)


def test_weight_dequant_edge_blocks_of_kv_a_proj_with_mqa():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 0x7F, size=KV_A_SHAPE).astype(np.uint8) | rng.choice([0, 0x80], size=KV_A_SHAPE).astype(np.uint8)
    scale = rng.uniform(0.5, 2.0, size=(5, 56)).astype(np.float32)  # not powers of two
    dequantised = weight_dequant(codes, scale)
    per_element_scale = np.kron(scale.astype(np.float64), np.ones((128, 128)))[:576, :7168]
    assert np.array_equal(dequantised, decode_fp8(codes) * per_element_scale)
    assert dequantised[575, 7167] == decode_fp8(codes[575:, 7167:])[0, 0] * float(scale[4, 55])
    assert dequantised[511, 0] == decode_fp8(codes[511:512, :1])[0, 0] * float(scale[3, 0])


def test_weight_dequant_names_the_scale_grid_it_expected():
    codes = np.zeros(KV_A_SHAPE, dtype=np.uint8)
    with pytest.raises(ShapeError, match=r"weight_scale_inv: expected shape \[5, 56\], got \[4, 56\] \(FP8.4\)"):
        weight_dequant(codes, np.ones((4, 56), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"weight: expected uint8"):
        weight_dequant(codes.astype(np.float32), np.ones((5, 56), dtype=np.float32))
    with pytest.raises(InputError, match="weight_scale_inv"):
        weight_dequant(codes, np.zeros((5, 56), dtype=np.float32))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_weight_quant_block_scales(scale_fmt):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((300, 200)) * rng.uniform(0.001, 10, size=(300, 1))
    weight[256:, 128:] = 0.0  # an all-zero edge block
    codes, scale = weight_quant(weight, scale_fmt)
    assert codes.shape == weight.shape and scale.shape == (3, 2) and scale.dtype == np.float32
    amax = np.array([[np.abs(weight[r:r + 128, c:c + 128]).max() for c in (0, 128)] for r in (0, 128, 256)])
    floored = np.maximum(amax, np.float32(1e-4))
    assert np.all(scale >= floored / 448 * (1 - 2 ** -23))
    if scale_fmt == "ue8m0":
        assert np.array_equal(scale, 2.0 ** np.round(np.log2(scale.astype(np.float64))))
        assert np.all(scale < floored / 448 * 2)
    else:  # the block's largest magnitude maps to the largest code
        assert np.allclose(scale, floored / 448, rtol=2 ** -23, atol=0)
        for r, c in ((0, 0), (1, 1), (2, 0)):
            block = weight[128 * r:128 * r + 128, 128 * c:128 * c + 128]
            where = np.unravel_index(np.abs(block).argmax(), block.shape)
            assert codes[128 * r + where[0], 128 * c + where[1]] & 0x7F == 0x7E
    dequantised = weight_dequant(codes, scale)
    per_element_scale = np.kron(scale.astype(np.float64), np.ones((128, 128)))[:300, :200]
    # e4m3: half a step is <= 2^-4 of the value for normals, 2^-10 in units of the scale for subnormals
    bound = np.maximum(2.0 ** -4 * np.abs(weight), 2.0 ** -10 * per_element_scale) * (1 + 2 ** -20)
    assert np.all(np.abs(dequantised - weight) <= bound)
    assert np.all(dequantised[256:, 128:] == 0)


def test_weight_quant_refuses_bad_weights():
    with pytest.raises(InputError, match=r"weight: expected finite values \(FP8.5\)"):
        weight_quant(np.full((2, 2), np.nan))
    with pytest.raises(InputError, match="scale_fmt"):
        weight_quant(np.ones((2, 2)), "e8m0")


def activations(shape=(4, 3, 512), seed=11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(1e-3, 30, size=shape[:-1] + (1,))
    x[0, 0, :128] = 0.0  # an all-zero group: the amax floor
    x[1, 1, 5] = 2000.0  # an outlier
    return x.astype(np.float32)


@pytest.mark.parametrize("variant", ["v32", "v3"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_groups_of_128(variant, scale_fmt):
    x = activations()
    codes, scale = act_quant(x, scale_fmt, variant)
    assert codes.shape == x.shape and scale.shape == (4, 3, 4) and scale.dtype == np.float32
    amax = np.abs(x.astype(np.float64)).reshape(4, 3, 4, 128).max(axis=-1)
    floored = np.maximum(amax, np.float32(1e-4))
    assert np.all(scale >= floored / 448 * (1 - 2 ** -23))
    if scale_fmt == "ue8m0":
        assert np.array_equal(scale, 2.0 ** np.ceil(np.log2(floored / 448)))
    values = decode_fp8(codes)
    assert not np.any(np.isnan(values)) and np.abs(values).max() <= 448
    assert np.all(codes[0, 0, :128] == 0)
    per_element_scale = np.repeat(scale.astype(np.float64), 128, axis=-1)
    bound = np.maximum(2.0 ** -4 * np.abs(x), 2.0 ** -10 * per_element_scale) * (1 + 2 ** -20)
    assert np.all(np.abs(values * per_element_scale - x) <= bound)


def test_act_quant_variants_differ_only_in_the_plain_scale():
    x = activations(seed=12)
    v32_codes, v32_scale = act_quant(x, None, "v32")
    v3_codes, v3_scale = act_quant(x, None, "v3")
    ulps = np.abs(v32_scale.view(np.int32).astype(np.int64) - v3_scale.view(np.int32))
    assert ulps.max() <= 1
    assert np.array_equal(act_quant(x, "ue8m0", "v32")[1], act_quant(x, "ue8m0", "v3")[1])
    assert np.array_equal(v3_scale, (np.maximum(np.abs(x).reshape(4, 3, 4, 128).max(-1), np.float32(1e-4)) / np.float32(448)))


def test_act_quant_refuses_a_ragged_last_dimension():
    with pytest.raises(ShapeError, match=r"x: expected \[\.\.\., N\] with N a positive multiple of 128, got \[2, 100\] \(FP8.6\)"):
        act_quant(np.ones((2, 100)))
    with pytest.raises(InputError, match="variant"):
        act_quant(np.ones((2, 128)), variant="v4")


def gemm_operands(rows=6, depth=384, columns=200, scale_fmt=None, seed=13):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, depth)) * rng.uniform(0.01, 5, size=(1, depth))
    weight = rng.standard_normal((columns, depth)) * 0.05
    a, a_scale = act_quant(x, scale_fmt)
    b, b_scale = weight_quant(weight, scale_fmt)
    return a, a_scale, b, b_scale


def float32_accumulation_bound(a, a_scale, b, b_scale):
    """The float64 product of the dequantised operands and |y - it| allowed by the kernel's float32 operations:
    per K block three roundings (partial sum, a_s * b_s, their product), nb - 1 additions, then bf16."""
    rows, depth = a.shape
    blocks = depth // 128
    a_blocks = decode_fp8(a).reshape(rows, blocks, 128)
    b_blocks = decode_fp8(b).reshape(b.shape[0], blocks, 128)
    b_scale_rows = np.kron(b_scale.astype(np.float64), np.ones((128, 1)))[:b.shape[0]]  # [N, blocks]
    terms = np.einsum("mkj,nkj->mnk", a_blocks, b_blocks) * a_scale[:, None, :] * b_scale_rows[None, :, :]
    exact = terms.sum(axis=-1)
    accumulation = (blocks + 3) * U32 * np.abs(terms).sum(axis=-1)
    return exact, U_BF16 * np.abs(exact) + (1 + U_BF16) * accumulation


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_gemm_within_the_derived_bound_of_the_dequantised_product(scale_fmt):
    a, a_scale, b, b_scale = gemm_operands(scale_fmt=scale_fmt)
    y = fp8_gemm(a, a_scale, b, b_scale)
    assert y.shape == (6, 200)
    assert np.array_equal(y.astype(np.float32).view(np.uint32) & 0xFFFF, np.zeros(y.shape, dtype=np.uint32))  # bf16 values
    exact, bound = float32_accumulation_bound(a, a_scale, b, b_scale)
    dequantised = (decode_fp8(a) * np.repeat(a_scale.astype(np.float64), 128, axis=1)) @ weight_dequant(b, b_scale).T
    assert np.allclose(exact, dequantised, rtol=1e-12, atol=1e-12 * np.abs(dequantised).max())
    assert np.all(np.abs(y - exact) <= bound)


def test_fp8_gemm_bound_rejects_a_wrong_weight_scale_row():
    """The bound is tight enough to see the weight scales of the two output row blocks swapped."""
    a, a_scale, b, b_scale = gemm_operands()
    exact, bound = float32_accumulation_bound(a, a_scale, b, b_scale)
    y = fp8_gemm(a, a_scale, b, b_scale[::-1])
    assert np.mean(np.abs(y - exact) > bound) > 0.5


def test_fp8_gemm_is_exact_on_small_integers_with_power_of_two_scales():
    a = encode_fp8(np.arange(256).reshape(2, 128) % 7 - 3.0)
    b = encode_fp8(np.ones((3, 128)))
    y = fp8_gemm(a, np.full((2, 1), 0.5, dtype=np.float32), b, np.full((1, 1), 4.0, dtype=np.float32))
    expected = 2.0 * (np.arange(256).reshape(2, 128) % 7 - 3.0).sum(axis=1)
    assert np.array_equal(y, np.repeat(expected[:, None], 3, axis=1))


def test_fp8_gemm_names_a_wrong_scale_shape():
    a, a_scale, b, b_scale = gemm_operands()
    with pytest.raises(ShapeError, match=r"b_scale: expected shape \[2, 3\], got \[3, 2\] \(FP8.7\)"):
        fp8_gemm(a, a_scale, b, b_scale.T)
    with pytest.raises(ShapeError, match=r"a, b: expected \[M, K\] and \[N, K\]"):
        fp8_gemm(a, a_scale, b[:, :256], b_scale)


def test_the_spec_shapes_are_the_shapes_the_steps_return():
    from mla_ref.explain import explain
    from mla_ref.config import load_preset
    from mla_ref.spec import evaluate_shape, step_by_id
    sizes = {"M": 576, "N": 7168}
    codes, scale = weight_quant(np.ones(KV_A_SHAPE))
    quant = step_by_id("FP8.5")["outputs"]
    assert evaluate_shape(quant["weight"], sizes) == codes.shape
    assert evaluate_shape(quant["weight_scale_inv"], sizes) == scale.shape == (5, 56)
    assert evaluate_shape(step_by_id("FP8.4")["inputs"]["weight_scale_inv"], sizes) == (5, 56)
    a, a_scale, b, b_scale = gemm_operands()
    gemm = step_by_id("FP8.7")["inputs"]
    symbols = {"M": a.shape[0], "K": a.shape[1], "N": b.shape[0]}
    assert evaluate_shape(gemm["a_scale"], symbols) == a_scale.shape
    assert evaluate_shape(gemm["b_scale"], symbols) == b_scale.shape
    for step in range(1, 9):
        assert f"FP8.{step} " in explain(f"FP8.{step}", load_preset("tiny"))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_linear_stays_within_the_quantisation_bound_of_the_float64_product(scale_fmt):
    """fp8 path: activation rounding (half an e4m3 step per element) through |W|, the kernel's float32 accumulation
    and the bf16 output; bf16 path: x and W rounded to bf16 (2^-8 each) and the output."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 3, 384)) * rng.uniform(0.1, 4, size=(1, 1, 384))
    weight, weight_scale_inv = weight_quant(rng.standard_normal((136, 384)) * 0.05, scale_fmt)
    weight_values = weight_dequant(weight, weight_scale_inv)
    exact = x @ weight_values.T
    y = fp8_linear(x, weight, weight_scale_inv, "fp8", scale_fmt)
    assert y.shape == (2, 3, 136)
    _, scale = act_quant(x.reshape(6, 384), scale_fmt)
    step = np.maximum(2.0 ** -4 * np.abs(x), 2.0 ** -10 * np.repeat(scale, 128, axis=1).reshape(x.shape))
    magnitude = np.abs(x) @ np.abs(weight_values).T
    bound = step @ np.abs(weight_values).T + 2.0 ** -8 * (np.abs(exact) + step @ np.abs(weight_values).T) + 6 * 2.0 ** -24 * magnitude * 2
    assert np.all(np.abs(y - exact) <= bound * (1 + 2 ** -8))
    y_bf16 = fp8_linear(x, weight, weight_scale_inv, "bf16")
    bf16_bound = 2.0 ** -8 * (2 * magnitude * (1 + 2 ** -8) + np.abs(exact)) * (1 + 2 ** -6)
    assert np.all(np.abs(y_bf16 - exact) <= bf16_bound)
    assert np.array_equal(y_bf16, round_bf16(y_bf16))


def test_fp8_linear_bf16_path_is_exact_on_bf16_friendly_values():
    x = np.arange(-64, 64, dtype=np.float64).reshape(1, 128) / 16
    weight = encode_fp8(np.ones((3, 128)))
    scale = np.full((1, 1), 0.5, dtype=np.float32)
    assert np.array_equal(fp8_linear(x, weight, scale, "bf16"), np.full((1, 3), x.sum() * 0.5))
    with pytest.raises(InputError, match=r"gemm_impl: .*FP8.8"):
        fp8_linear(x, weight, scale, "tf32")
    with pytest.raises(ShapeError, match=r"x: expected \[\.\.\., 128\], got \[1, 64\] \(FP8.8\)"):
        fp8_linear(x[:, :64], weight, scale, "bf16")
