"""RoPE / YaRN closed forms at zero tolerance, and the two layouts (spec/rope.yaml)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mla_ref import rope
from mla_ref.config import load_preset


def test_v3_constants_from_the_facts_sheet():
    config = load_preset("deepseek-v3")
    assert rope.yarn_correction_range(config) == (10, 23)
    assert rope.softmax_scale(config) == 0.1352337788608801
    assert rope.yarn_get_mscale(40.0, 1.0) == 1.3688879454113936
    assert rope.rope_amplitude(config) == 1.0


def test_v2_constants_from_the_facts_sheet():
    for name in ("deepseek-v2", "deepseek-v2-lite"):
        config = load_preset(name)
        assert rope.softmax_scale(config) == 0.1147213867929261
        assert rope.yarn_get_mscale(40.0, 0.707) == 1.2608037774058554


def test_v3_frequency_table_matches_the_fp32_samples():
    frequencies = rope.rope_frequencies(load_preset("deepseek-v3"))
    samples = {0: 1.0, 10: 0.05623413, 11: 0.03900693, 16: 0.0055, 22: 1.7782794e-4, 23: 3.3338038e-5, 31: 3.3338038e-6}
    for j, value in samples.items():
        assert math.isclose(frequencies[j], value, rel_tol=2e-7), j


def test_ramp_is_linear_between_low_and_high():
    config = load_preset("deepseek-v3")
    ramp = rope.yarn_ramp(config)
    assert np.all(ramp[:11] == 0.0) and np.all(ramp[23:] == 1.0)
    assert ramp[11] == 1 / 13 and ramp[16] == 6 / 13
    base = rope.base_inverse_frequencies(config)
    frequencies = rope.rope_frequencies(config)
    assert np.array_equal(frequencies[:11], base[:11]) and np.array_equal(frequencies[23:], base[23:] / 40.0)


def test_kimi_k2_equal_betas_give_a_single_step():
    config = load_preset("kimi-k2")
    assert rope.yarn_correction_range(config) == (19, 20)
    ramp = rope.yarn_ramp(config)
    assert np.all(ramp[:20] == 0.0) and np.all(ramp[20:] == 1.0)
    untruncated = config.replace(yarn_truncate=False)
    low, high = rope.yarn_correction_range(untruncated)
    assert low == high and 19 < low < 20  # the 0.001 guard then decides
    assert np.all(np.isin(rope.yarn_ramp(untruncated), [0.0, 1.0]))


def test_official_activation_rule_switches_yarn_off_for_short_max_seq_len():
    config = load_preset("deepseek-v3").replace(yarn_activation="max_seq_len", max_seq_len=4096)
    assert not config.yarn_active
    assert rope.softmax_scale(config) == 192 ** -0.5
    assert np.array_equal(rope.rope_frequencies(config), rope.base_inverse_frequencies(config))
    assert load_preset("deepseek-v3").replace(yarn_activation="max_seq_len").yarn_active  # default 16384 > 4096


def test_amplitude_when_mscale_differs_from_mscale_all_dim():
    config = load_preset("tiny-mscale-mismatch")
    expected = (0.1 * 0.9 * math.log(40) + 1) / (0.1 * 0.6 * math.log(40) + 1)
    assert math.isclose(rope.rope_amplitude(config), expected, rel_tol=1e-15)
    assert math.isclose(rope.softmax_scale(config), 24 ** -0.5 * (0.1 * 0.6 * math.log(40) + 1) ** 2, rel_tol=1e-15)


def test_rope_of_unit_vectors_at_known_positions():
    config = load_preset("tiny")  # d = 16, theta 1e4, no YaRN: f_0 = 1, f_4 = 1e4 ** -0.5 = 0.01
    for position, j, angle in [(0, 0, 0.0), (3, 0, 3.0), (100, 4, 1.0), (7, 0, 7.0)]:
        cos, sin = rope.rope_angles(config, np.array([position]))
        real_unit = np.zeros(16)
        real_unit[2 * j] = 1.0
        out = rope.apply_rope(real_unit, cos[0], sin[0], "interleaved")
        expected = np.zeros(16)
        expected[2 * j], expected[2 * j + 1] = math.cos(angle), math.sin(angle)
        assert np.array_equal(out, expected)
        imag_unit = np.zeros(16)
        imag_unit[j + 8] = 1.0
        out = rope.apply_rope(imag_unit, cos[0], sin[0], "half")
        expected = np.zeros(16)
        expected[j], expected[j + 8] = -math.sin(angle), math.cos(angle)
        assert np.array_equal(out, expected)


def test_rotation_preserves_norm_and_relative_position():
    config = load_preset("tiny-yarn")
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal(32), rng.standard_normal(32)
    dots = []
    for shift in (0, 1000, 70000):
        cos, sin = rope.rope_angles(config, np.array([shift + 9, shift + 4]))
        q_rot = rope.apply_rope(q, cos[0], sin[0], "interleaved")
        k_rot = rope.apply_rope(k, cos[1], sin[1], "interleaved")
        assert math.isclose(np.linalg.norm(q_rot), np.linalg.norm(q), rel_tol=1e-14)
        dots.append(q_rot @ k_rot)
    assert np.allclose(dots, dots[0], rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 40), position=st.integers(0, 200000), seed=st.integers(0, 2**32 - 1))
def test_half_layout_permutation_identity(half, position, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 2 * half))
    angles = position * rng.uniform(0, 1, half)
    cos, sin = np.cos(angles), np.sin(angles)
    permutation = rope.half_layout_permutation(2 * half)
    assert np.array_equal(rope.apply_rope(x[:, permutation], cos, sin, "half"),
                          rope.apply_rope(x, cos, sin, "interleaved")[:, permutation])


@pytest.mark.parametrize("name", ["tiny-yarn", "tiny-mscale-mismatch", "deepseek-v3"])
def test_float32_table_is_off_by_the_position_times_an_ulp(name):
    """ROPE.5 in float32 (tolerance.yaml rope_table): frequencies within a few float32 roundings (pow, reciprocal, YaRN
    blend), so an angle p f_j is off by at most ~4 u32 p f_j and cos / sin by that plus their own rounding; far out that
    is ~1e-3, near position 0 a rounding. The float64 table is the default, untouched."""
    config = load_preset(name)
    u32 = 2.0 ** -24
    positions = np.array([[0, 1, 7, 40, 1500, 5000, 70000, 150000]]) % config.max_position_embeddings
    frequencies = rope.rope_frequencies(config)
    assert np.all(np.abs(rope.rope_frequencies(config, np.float32) / frequencies - 1) <= 4 * u32)
    amplitude = rope.rope_amplitude(config)
    exact = rope.rope_angles(config, positions)
    table = rope.rope_angles(config, positions, np.float64, np.float32)
    bound = amplitude * (4 * u32 * positions[..., None] * frequencies + 2 * u32)
    for exact_part, table_part in zip(exact, table):
        error = np.abs(table_part - exact_part)
        assert np.all(error <= bound), float(np.max(error / bound))
        assert error[0, 0].max() <= 2 * u32 * amplitude and error[0, -2].max() > 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(exact, rope.rope_angles(config, positions, np.float64, np.float64)))


def test_a_correction_range_past_the_rotated_dims_is_clamped_at_d_minus_1():
    """rope_theta 10, L_orig 1024, d = 64: high = ceil(64 ln(1024 / 2 pi) / (2 ln 10)) = ceil(70.8) = 71 > d - 1, so the clamp
    decides (at d - 1 = 63, not d/2 - 1 = 31: the ramp then ends past the last rotated pair); low = floor(64 ln(1024 / 64 pi) / (2 ln 10)) = 22."""
    config = load_preset("deepseek-v3").replace(rope_theta=10.0, original_max_position_embeddings=1024)
    assert config.yarn_active and config.qk_rope_head_dim == 64
    assert rope.yarn_correction_range(config) == (22, 63)
    ramp = rope.yarn_ramp(config)
    assert ramp[22] == 0.0 and ramp[31] == 9 / 41 and np.array_equal(ramp, np.clip((np.arange(32) - 22) / 41, 0.0, 1.0))
    base = 10.0 ** -(np.arange(32) / 32)
    assert np.allclose(rope.rope_frequencies(config), base / 40.0 * ramp + base * (1 - ramp), rtol=1e-14, atol=0)
