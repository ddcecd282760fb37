"""An independent float64 implementation of the MLA entry points, with RoPE built by other exact formulas (fp64 profile).

Written from spec/rope.yaml and spec/mla.yaml without mla_ref, to be checked through the adapter
protocol (``PYTHONPATH=tests mla-ref check tests/independent_fp64_adapter.py --profile fp64``):

* base frequencies literally as ROPE.1 states them, ``theta ** (-2j / d)`` (the reference computes
  ``1 / theta ** (2j / d)``), and the YaRN blend in Hugging Face's order (extrapolation weight
  ``1 - ramp``);
* cos and sin as the real and imaginary parts of ``amplitude * exp(i * angle)``, the rotation a
  complex product;
* attention in the naive form with einsum, one sequence at a time, over [cached rows | new tokens];
  the FlashMLA-layout kernel is the loop oracle of tests/independent_mla.py.

Both RoPE routes are exact formulas whose float64 frequencies differ by an ulp or two; an angle at
position p then moves by ~p x ulp(freq), a freedom the fp64 profile must accept (spec/tolerance.yaml).
"""

from __future__ import annotations

import types

import numpy as np

from independent_mla import _correction_dim, _yarn_is_on, slow_latent_core, slow_rope_amplitude, slow_softmax_scale

PROFILE = "fp64"


def _cfg(config: dict):
    return types.SimpleNamespace(**config)


def frequencies(cfg) -> np.ndarray:
    """ROPE.1-ROPE.3 — ``theta ** (-2j/d)``, blended towards ``freq / factor`` by the YaRN ramp: [rope_half]."""
    d = int(cfg.qk_rope_head_dim)
    inv_freq = float(cfg.rope_theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if not _yarn_is_on(cfg):
        return inv_freq
    theta, original = float(cfg.rope_theta), int(cfg.original_max_position_embeddings)
    low = _correction_dim(float(cfg.beta_fast), d, theta, original)
    high = _correction_dim(float(cfg.beta_slow), d, theta, original)
    if cfg.yarn_truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0.0), min(high, d - 1.0)
    ramp = np.clip((np.arange(d // 2) - low) / ((high - low) or 0.001), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    return inv_freq * extrapolation + inv_freq / float(cfg.rope_factor) * (1.0 - extrapolation)


def rotate(cfg, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """ROPE.5-ROPE.6 — ``x [seq, ..., d]`` rotated at ``positions [seq]`` by ``amplitude * exp(i * position * freq)``."""
    turn = slow_rope_amplitude(cfg) * np.exp(1j * positions.astype(np.float64)[:, None] * frequencies(cfg))  # [seq, half]
    turn = turn.reshape(turn.shape[:1] + (1,) * (x.ndim - 2) + turn.shape[1:])
    half = x.shape[-1] // 2
    if cfg.rope_layout == "interleaved":
        rotated = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
        return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)
    rotated = (x[..., :half] + 1j * x[..., half:]) * turn
    return np.concatenate([rotated.real, rotated.imag], axis=-1)


def _rms(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def _sequence(cfg, w: dict, hidden: np.ndarray, positions: np.ndarray, cached: np.ndarray):
    """One sequence: ``hidden [n, hidden_size]`` at ``positions``, after ``cached [m, rank + rope]`` rows at 0..m-1.

    Returns the layer output [n, hidden_size], lse [heads, n], the new cache rows [n, rank + rope], q_pe and k_pe.
    """
    heads, nope, rank = int(cfg.num_attention_heads), int(cfg.qk_nope_head_dim), int(cfg.kv_lora_rank)
    if cfg.q_lora_rank:
        q = _rms(hidden @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], cfg.rms_norm_eps) @ w["q_b_proj.weight"].T
    else:
        q = hidden @ w["q_proj.weight"].T
    q = q.reshape(len(hidden), heads, -1)  # [n, heads, nope + rope]
    q_nope, q_pe = q[..., :nope], rotate(cfg, q[..., nope:], positions)
    kv_a = hidden @ w["kv_a_proj_with_mqa.weight"].T  # [n, rank + rope]
    k_pe = rotate(cfg, kv_a[:, rank:], positions)
    new_rows = np.concatenate([_rms(kv_a[:, :rank], w["kv_a_layernorm.weight"], cfg.rms_norm_eps), k_pe], axis=1)
    rows = np.concatenate([cached, new_rows], axis=0)  # [keys, rank + rope]
    key_positions = np.concatenate([np.arange(len(cached)), positions])
    kv = (rows[:, :rank] @ w["kv_b_proj.weight"].T).reshape(len(rows), heads, -1)  # [keys, heads, nope + v]
    logits = np.einsum("ihd,jhd->hij", q_nope, kv[..., :nope]) + np.einsum("ihd,jd->hij", q_pe, rows[:, rank:])
    logits = slow_softmax_scale(cfg) * logits  # [heads, n, keys]
    logits = np.where(key_positions[None, None, :] <= positions[None, :, None], logits, -np.inf)
    peak = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - peak)
    total = weights.sum(axis=-1, keepdims=True)
    attended = np.einsum("hij,jhv->ihv", weights / total, kv[..., nope:])  # [n, heads, v]
    output = attended.reshape(len(hidden), -1) @ w["o_proj.weight"].T
    return output, (peak + np.log(total))[..., 0], new_rows, q_pe, k_pe


def mla_prefill(config, weights, hidden, start_positions):
    cfg = _cfg(config)
    batch, seq, _ = hidden.shape
    width = int(cfg.kv_lora_rank) + int(cfg.qk_rope_head_dim)
    results = [_sequence(cfg, weights, hidden[b], int(start_positions[b]) + np.arange(seq), np.zeros((0, width)))
               for b in range(batch)]
    return {"output": np.stack([r[0] for r in results]), "lse": np.stack([r[1] for r in results]),
            "MLA.4/q_pe": np.stack([r[3] for r in results]), "MLA.4/k_pe": np.stack([r[4] for r in results])}


def mla_extend(config, weights, hidden, cache_rows, cache_lengths, query_lengths):
    cfg = _cfg(config)
    batch, seq, _ = hidden.shape
    heads, rope = int(cfg.num_attention_heads), int(cfg.qk_rope_head_dim)
    output = np.zeros(hidden.shape[:2] + (weights["o_proj.weight"].shape[0],))
    rows = np.zeros((batch, seq, cache_rows.shape[-1]))
    q_pe, k_pe = np.zeros((batch, seq, heads, rope)), np.zeros((batch, seq, rope))
    for b in range(batch):
        cached, new = int(cache_lengths[b]), int(query_lengths[b])
        result = _sequence(cfg, weights, hidden[b, :new], cached + np.arange(new), cache_rows[b, :cached])
        output[b, :new], rows[b, :new], q_pe[b, :new], k_pe[b, :new] = result[0], result[2], result[3], result[4]
    return {"output": output, "rows": rows, "MLA.4/q_pe": q_pe, "MLA.4/k_pe": k_pe}


def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    out, lse = slow_latent_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    return {"out": out, "lse": lse}
