"""Rounding emulation: nearest-even to bf16 / fp16 / tf32, checked against exhaustive and closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest

from mla_ref.precision import K_BLOCK, UNIT_ROUNDOFF, exp, log, matmul, round_bf16, round_fp16, round_fp32, round_tf32


def test_bf16_ties_go_to_even_and_specials_pass():
    one = 1.0
    ulp = 2.0 ** -7
    cases = {one + ulp / 2: one, one + 3 * ulp / 2: one + 2 * ulp, one + ulp / 2 + 2 ** -20: one + ulp,
             -(one + 3 * ulp / 2): -(one + 2 * ulp), 0.0: 0.0, 3.4e38: np.inf, 3.3895313892515355e38: 3.3895313892515355e38}
    for value, expected in cases.items():
        assert round_bf16(np.array(value)) == expected, value
    assert np.isnan(round_bf16(np.array(np.nan)))
    assert round_bf16(np.array(-np.inf)) == -np.inf


def test_bf16_agrees_with_an_exhaustive_grid_search():
    """Every bf16 value is a float32 whose low 16 bits are 0: nearest-even over that grid, checked directly."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)).astype(np.float32)
    bits = x.view(np.uint32)
    below = (bits & 0xFFFF0000).view(np.float32).astype(np.float64)
    above = ((bits & 0xFFFF0000) + 0x10000).astype(np.uint32).view(np.float32).astype(np.float64)
    exact = x.astype(np.float64)
    distance_below, distance_above = np.abs(exact - below), np.abs(above - exact)
    below_is_even = ((bits >> 16) & 1) == 0
    expected = np.where(distance_below < distance_above, below,
                        np.where(distance_above < distance_below, above, np.where(below_is_even, below, above)))
    assert np.array_equal(round_bf16(x), expected)


@pytest.mark.parametrize("rounding, fmt", [(round_bf16, "bf16"), (round_fp16, "fp16"), (round_tf32, "tf32"), (round_fp32, "fp32")])
def test_relative_error_is_at_most_the_unit_roundoff(rounding, fmt):
    x = np.random.default_rng(1).uniform(0.5, 2.0, 10000) * np.random.default_rng(2).choice([-1, 1], 10000)
    assert np.max(np.abs(rounding(x) - x) / np.abs(x)) <= UNIT_ROUNDOFF[fmt]
    assert np.array_equal(rounding(rounding(x)), rounding(x))  # idempotent


def test_tf32_keeps_ten_mantissa_bits():
    assert round_tf32(np.array(1.0 + 2.0 ** -10)) == 1.0 + 2.0 ** -10
    assert round_tf32(np.array(1.0 + 2.0 ** -11)) == 1.0  # tie to even
    assert round_tf32(np.array(1.0 + 3 * 2.0 ** -11)) == 1.0 + 2.0 ** -9


@pytest.mark.parametrize("rounding, precision_bits", [(round_bf16, 8), (round_tf32, 11)])
def test_rounding_equals_frexp_round_half_even_on_normal_floats(rounding, precision_bits):
    """Independent derivation: significand scaled to the kept bits, np.round (half to even), scaled back."""
    rng = np.random.default_rng(7)
    single = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    tiny, huge = np.finfo(np.float32).tiny, np.finfo(np.float32).max / 2
    normal = single[np.isfinite(single) & (np.abs(single) >= tiny) & (np.abs(single) <= huge)].astype(np.float64)
    significand, exponent = np.frexp(normal)  # significand in [0.5, 1)
    expected = np.ldexp(np.round(significand * 2.0 ** precision_bits), exponent - precision_bits)
    np.testing.assert_array_equal(rounding(normal.astype(np.float32)), expected)


def _blocked_float32_dot(row, column, block: int) -> np.float32:
    """One output of the TOLERANCE.2 float32 product, element by element in Python floats (float64): exact
    products (24 + 24 bits fit in 53), each partial sum of a block rounded to float32 before the next term,
    each block's sum added to the float32 total."""
    total = np.float32(0.0)
    for start in range(0, len(row), block):
        partial = np.float32(0.0)
        for a, b in zip(row[start:start + block].tolist(), column[start:start + block].tolist()):
            partial = np.float32(float(partial) + a * b)
        total = np.float32(total + partial)
    return total


def test_float32_matmul_is_the_blocked_accumulation_of_tolerance_2():
    rng = np.random.default_rng(7)
    depth = 2 * K_BLOCK + 40  # two whole blocks and a part
    a = (rng.standard_normal((2, 3, depth)) * np.logspace(-3, 3, depth)).astype(np.float32)  # terms of very different sizes
    b = rng.standard_normal((depth, 4)).astype(np.float32)
    product = matmul(a, b)
    assert product.dtype == np.float32 and product.shape == (2, 3, 4)
    expected = np.array([[[_blocked_float32_dot(a[i, j], b[:, n], K_BLOCK) for n in range(4)] for j in range(3)] for i in range(2)])
    np.testing.assert_array_equal(product, expected)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert 0 < np.abs(product - exact).max() <= depth * 2.0 ** -24 * (np.abs(a).astype(np.float64) @ np.abs(b)).max()


def test_float64_matmul_and_transcendentals_are_numpys():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 6, 2))
    np.testing.assert_array_equal(matmul(a, b), np.matmul(a, b))
    np.testing.assert_array_equal(exp(a), np.exp(a))
    np.testing.assert_array_equal(log(np.abs(a)), np.log(np.abs(a)))


def test_float32_exp_and_log_are_the_float64_values_rounded_once():
    x = np.linspace(-80.0, 80.0, 100001).astype(np.float32)
    np.testing.assert_array_equal(exp(x), np.exp(x.astype(np.float64)).astype(np.float32))
    positive = np.abs(x) + np.float32(1e-30)
    np.testing.assert_array_equal(log(positive), np.log(positive.astype(np.float64)).astype(np.float32))
    out = np.empty_like(x)
    assert exp(x, out=out) is out and out.dtype == np.float32
