"""An independent, deliberately slow float64 oracle for Multi-head Latent Attention.

This module is a test oracle only. It does not use the package's MLA, RoPE, norm or
cache code. It is written from the numerics facts sheet
(shared/facts/deepseek-mla-moe-mtp.md, sections 1-5 and 10) and favours plain loops
and scalar arithmetic over speed, so that each step can be read and checked by eye:

* RoPE frequencies and the DeepSeek YaRN blend are computed one element at a time
  with the ``math`` module;
* the rotation multiplies Python complex numbers by ``amplitude * exp(i * pos * f)``;
* attention loops over query tokens, heads and keys, with the softmax and its
  max subtraction written out.

The config argument only needs the fields read here (a ``ModelConfig`` or any object,
such as ``types.SimpleNamespace``, that has them).
"""

from __future__ import annotations

import cmath
import math
import struct

import numpy as np


# --------------------------------------------------------------------------- YaRN helpers


def _yarn_is_on(cfg) -> bool:
    """True when the YaRN frequencies, the cos/sin amplitude and m^2 apply."""
    if getattr(cfg, "rope_scaling_type", None) != "yarn":
        return False
    if cfg.yarn_activation == "always":
        return True
    return cfg.max_seq_len > cfg.original_max_position_embeddings


def _magnitude(scale_factor: float, coefficient: float) -> float:
    """YaRN magnitude correction: 1 for scale_factor <= 1, else 0.1*c*ln(s) + 1."""
    if scale_factor <= 1.0:
        return 1.0
    return 0.1 * coefficient * math.log(scale_factor) + 1.0


def _correction_dim(rotations: float, rope_dim: int, base: float, original_len: int) -> float:
    """The (fractional) dimension index whose wavelength makes `rotations` turns over L_orig."""
    return rope_dim * math.log(original_len / (2.0 * math.pi * rotations)) / (2.0 * math.log(base))


# --------------------------------------------------------------------------- 1. frequencies


def slow_frequencies(cfg) -> np.ndarray:
    """Angular frequency of each rotated pair, shape [qk_rope_head_dim // 2], float64."""
    d = int(cfg.qk_rope_head_dim)
    theta = float(cfg.rope_theta)
    n_pairs = d // 2

    plain = []
    for j in range(n_pairs):
        exponent = (2.0 * j) / d
        plain.append(1.0 / (theta ** exponent))

    if not _yarn_is_on(cfg):
        return np.array(plain, dtype=np.float64)

    factor = float(cfg.rope_factor)
    original_len = int(cfg.original_max_position_embeddings)
    low_raw = _correction_dim(float(cfg.beta_fast), d, theta, original_len)
    high_raw = _correction_dim(float(cfg.beta_slow), d, theta, original_len)
    if cfg.yarn_truncate:
        low_raw = math.floor(low_raw)
        high_raw = math.ceil(high_raw)
    low = max(low_raw, 0)
    high = min(high_raw, d - 1)
    if low == high:
        high = high + 0.001

    blended = []
    for j in range(n_pairs):
        ramp = (j - low) / (high - low)
        if ramp < 0.0:
            ramp = 0.0
        if ramp > 1.0:
            ramp = 1.0
        interpolated = plain[j] / factor  # the slowed-down (interpolated) frequency
        extrapolated = plain[j]  # the original frequency
        blended.append(interpolated * ramp + extrapolated * (1.0 - ramp))
    return np.array(blended, dtype=np.float64)


# --------------------------------------------------------------------------- 2. scales


def slow_softmax_scale(cfg) -> float:
    """qk_head_dim**-0.5, times m**2 with m = get_mscale(factor, mscale_all_dim) under YaRN."""
    qk_head_dim = int(cfg.qk_nope_head_dim) + int(cfg.qk_rope_head_dim)
    base = 1.0 / math.sqrt(qk_head_dim)
    if not _yarn_is_on(cfg):
        return base
    m = _magnitude(float(cfg.rope_factor), float(cfg.mscale_all_dim))
    return base * m * m


def slow_rope_amplitude(cfg) -> float:
    """Factor multiplying cos and sin: get_mscale(f, mscale) / get_mscale(f, mscale_all_dim)."""
    if not _yarn_is_on(cfg):
        return 1.0
    factor = float(cfg.rope_factor)
    return _magnitude(factor, float(cfg.mscale)) / _magnitude(factor, float(cfg.mscale_all_dim))


# --------------------------------------------------------------------------- 3. RoPE


def slow_rotate(vector, position: int, frequencies, amplitude: float, layout: str) -> np.ndarray:
    """Rotate one rope vector (length d) at an absolute position, with complex numbers.

    interleaved: pair j is (x[2j], x[2j+1]); half: pair j is (x[j], x[j + d/2]).
    Each pair is read as re + i*im, multiplied by amplitude * exp(i * position * f_j),
    and written back to the same two slots.
    """
    x = [float(v) for v in vector]
    d = len(x)
    half = d // 2
    out = [0.0] * d
    for j in range(half):
        if layout == "interleaved":
            re_slot, im_slot = 2 * j, 2 * j + 1
        elif layout == "half":
            re_slot, im_slot = j, j + half
        else:
            raise ValueError(f"unknown rope layout {layout!r}")
        z = complex(x[re_slot], x[im_slot])
        angle = float(position) * float(frequencies[j])
        w = z * (amplitude * cmath.exp(1j * angle))
        out[re_slot] = w.real
        out[im_slot] = w.imag
    return np.array(out, dtype=np.float64)


# --------------------------------------------------------------------------- helpers


def _rms_norm(vector, gain, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * g, written out."""
    x = np.asarray(vector, dtype=np.float64)
    g = np.asarray(gain, dtype=np.float64)
    total = 0.0
    for value in x:
        total += float(value) * float(value)
    mean_square = total / len(x)
    inv = 1.0 / math.sqrt(mean_square + eps)
    return np.array([float(x[k]) * inv * float(g[k]) for k in range(len(x))], dtype=np.float64)


def _linear(vector, weight) -> np.ndarray:
    """x @ W.T for one vector, one output row at a time."""
    w = np.asarray(weight, dtype=np.float64)
    x = np.asarray(vector, dtype=np.float64)
    return np.array([np.dot(w[r], x) for r in range(w.shape[0])], dtype=np.float64)


def _softmax_with_lse(logits):
    """Stable softmax over a list of floats and the natural-log sum of exponentials."""
    biggest = max(logits)
    exps = [math.exp(value - biggest) for value in logits]
    total = 0.0
    for e in exps:
        total += e
    probs = [e / total for e in exps]
    lse = biggest + math.log(total)
    return probs, lse


# --------------------------------------------------------------------------- 4. full MLA


def slow_mla(cfg, weights, hidden, positions, sees=None):
    """MLA for one sequence. Returns (out [T, hidden_size], lse [heads, T]) in float64.

    `weights` maps HF attention tensor names relative to ``self_attn.`` to arrays.
    `positions` are absolute; key j is visible to query i iff positions[j] <= positions[i]
    (``sees(i, j)`` replaces that rule: tests build a wrongly masked MLA with it).
    """
    x_all = np.asarray(hidden, dtype=np.float64)
    n_tokens = x_all.shape[0]
    pos = [int(p) for p in positions]
    assert len(pos) == n_tokens
    heads = int(cfg.num_attention_heads)
    nope = int(cfg.qk_nope_head_dim)
    rope = int(cfg.qk_rope_head_dim)
    vdim = int(cfg.v_head_dim)
    latent_dim = int(cfg.kv_lora_rank)
    eps = float(cfg.rms_norm_eps)
    qk = nope + rope

    def get(name):
        return np.asarray(weights[name], dtype=np.float64)

    freqs = slow_frequencies(cfg)
    amp = slow_rope_amplitude(cfg)
    scale = slow_softmax_scale(cfg)
    layout = cfg.rope_layout

    # Per-token projections: q per head (nope, rotated rope); shared rotated k_rope;
    # k_nope and v per head from the normalised latent.
    q_nope = [[None] * heads for _ in range(n_tokens)]
    q_rope = [[None] * heads for _ in range(n_tokens)]
    k_nope = [[None] * heads for _ in range(n_tokens)]
    values = [[None] * heads for _ in range(n_tokens)]
    k_rope = [None] * n_tokens

    kv_b = get("kv_b_proj.weight")
    for i in range(n_tokens):
        x = x_all[i]
        if cfg.q_lora_rank is None:
            q_flat = _linear(x, get("q_proj.weight"))
        else:
            c_q = _rms_norm(_linear(x, get("q_a_proj.weight")), get("q_a_layernorm.weight"), eps)
            q_flat = _linear(c_q, get("q_b_proj.weight"))
        for h in range(heads):
            start = h * qk
            q_nope[i][h] = q_flat[start:start + nope].copy()
            q_rope[i][h] = slow_rotate(q_flat[start + nope:start + qk], pos[i], freqs, amp, layout)

        kv_a = _linear(x, get("kv_a_proj_with_mqa.weight"))
        latent = _rms_norm(kv_a[:latent_dim], get("kv_a_layernorm.weight"), eps)
        k_rope[i] = slow_rotate(kv_a[latent_dim:latent_dim + rope], pos[i], freqs, amp, layout)

        kv = _linear(latent, kv_b)
        for h in range(heads):
            start = h * (nope + vdim)
            k_nope[i][h] = kv[start:start + nope].copy()
            values[i][h] = kv[start + nope:start + nope + vdim].copy()

    out_heads = np.zeros((n_tokens, heads * vdim), dtype=np.float64)
    lse = np.full((heads, n_tokens), -np.inf, dtype=np.float64)
    for i in range(n_tokens):
        for h in range(heads):
            visible = [j for j in range(n_tokens) if (pos[j] <= pos[i] if sees is None else sees(i, j))]
            if not visible:
                continue
            logits = []
            for j in visible:
                dot = float(np.dot(q_nope[i][h], k_nope[j][h])) + float(np.dot(q_rope[i][h], k_rope[j]))
                logits.append(scale * dot)
            probs, lse[h, i] = _softmax_with_lse(logits)
            acc = np.zeros(vdim, dtype=np.float64)
            for p, j in zip(probs, visible):
                acc = acc + p * values[j][h]
            out_heads[i, h * vdim:(h + 1) * vdim] = acc

    wo = get("o_proj.weight")
    out = np.zeros((n_tokens, wo.shape[0]), dtype=np.float64)
    for i in range(n_tokens):
        out[i] = _linear(out_heads[i], wo)
    return out, lse


# --------------------------------------------------------------------------- 5. latent core


def _e4m3fn(byte: int) -> float:
    """One OCP e4m3fn byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * math.ldexp(mantissa, -9)
    return sign * math.ldexp(8 + mantissa, exponent - 10)


def slow_record_row(record, head_dim_v: int) -> np.ndarray:
    """FlashMLA's FP8 cache record byte by byte: head_dim_v e4m3fn codes, one '<f' scale per 128, '<' bf16 rope values."""
    raw = bytes(np.asarray(record, dtype=np.uint8).tolist())
    tiles = head_dim_v // 128
    scales = struct.unpack_from(f"<{tiles}f", raw, head_dim_v)
    latent = [_e4m3fn(raw[i]) * scales[i // 128] for i in range(head_dim_v)]
    rope = [struct.unpack("<f", b"\0\0" + raw[k:k + 2])[0] for k in range(head_dim_v + 4 * tiles, len(raw), 2)]
    return np.array(latent + rope, dtype=np.float64)


def slow_latent_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """FlashMLA-layout latent attention over a paged single-head cache, in float64.

    q [b, s_q, h, W]; k_cache [num_blocks, block_size, 1, W]; values = first head_dim_v
    entries of a cache row. Returns (out [b, s_q, h, head_dim_v], lse [b, h, s_q]).
    Rows at t >= cache_seqlens[i] are never read. A query with no visible key gets
    out = 0 and lse = -inf. A uint8 k_cache holds FP8 records (spec/fp8.yaml FP8.11).
    """
    q = np.asarray(q, dtype=np.float64)
    cache = np.asarray(k_cache)
    batch, s_q, heads, _ = q.shape
    block_size = cache.shape[1]
    out = np.zeros((batch, s_q, heads, head_dim_v), dtype=np.float64)
    lse = np.full((batch, heads, s_q), -np.inf, dtype=np.float64)

    for i in range(batch):
        length = int(cache_seqlens[i])

        def row(t):
            block = int(block_table[i][t // block_size])
            if cache.dtype == np.uint8:
                return slow_record_row(cache[block, t % block_size, 0], head_dim_v)
            return np.asarray(cache[block, t % block_size, 0], dtype=np.float64)

        for r in range(s_q):
            if causal:
                last = length - s_q + r  # the last visible key index
                visible = [t for t in range(length) if t <= last]
            else:
                visible = list(range(length))
            if not visible:
                continue
            rows = [row(t) for t in visible]
            for h in range(heads):
                logits = [float(softmax_scale) * float(np.dot(q[i, r, h], k)) for k in rows]
                probs, lse[i, h, r] = _softmax_with_lse(logits)
                acc = np.zeros(head_dim_v, dtype=np.float64)
                for p, k in zip(probs, rows):
                    acc = acc + p * k[:head_dim_v]
                out[i, r, h] = acc
    return out, lse
