"""A JAX port of DeepSeek MLA, DeepSeek-MoE, the decoder stack and MTP, checked by mla-ref.

Written the way a JAX engine writes it, independently of mla_ref: jax.numpy, jit around each
layer, weights and activations in one storage dtype, and the statistics a flash-style kernel
keeps wide -- attention logits, softmax, LSE, RMSNorm statistics, RoPE and the whole router --
in float32 (float64 in float64 mode). Prefill runs the naive form (per-head keys and values);
decode, chunked prefill and verification run the absorbed form against latent cache rows
``[normalised latent | rotated k_pe]``; the FlashMLA-layout kernel gathers a paged cache and
never lets a slot past ``cache_seqlens`` reach the softmax (the golden cases fill those slots
with NaN). Routed experts run as a grouped GEMM (``jax.lax.ragged_dot``) over the assignments
sorted by expert. The decoder stack chains pre-norm blocks over per-layer latent caches; the
MTP modules chain ``eh_proj([enorm(Emb) ; hnorm(h)])``, a decoder block and the shared head;
speculative decoding drafts with them and verifies D + 1 tokens per step. Every entry point of
spec/golden.yaml's adapter protocol is here, and each also returns its intermediates as
``<STEP>/<name>`` so the checker names the first step that diverges.

Precision is the one thing the protocol's arguments do not carry, so it is read once, at
import, from ``MLA_REF_JAX_DTYPE``: ``float32`` (default, profile fp32), ``bfloat16`` (bf16)
or ``float64`` (fp64; turns on ``jax_enable_x64`` for the process). ``PROFILE`` names the
matching profile of spec/tolerance.yaml::

    mla-ref check examples/jax_mla.py --profile fp32
    MLA_REF_JAX_DTYPE=bfloat16 mla-ref check examples/jax_mla.py --profile bf16
    MLA_REF_JAX_DTYPE=float64 mla-ref check examples/jax_mla.py --profile fp64

Matmul precision (measured with jax / jaxlib 0.10.2 on an x86-64 CPU). JAX's default matmul
precision for float32 inputs is ``DEFAULT``, which on NVIDIA A100 / H100 means TF32 tensor
cores (10 mantissa bits) and on TPU one bfloat16 pass. On the CPU backend the setting changes
nothing: ``jnp.dot`` on float32 gives bit-identical results under ``default``, ``high``,
``highest``, ``bfloat16`` and ``tensorfloat32`` (and the ``BF16_BF16_F32`` algorithm), all
true float32 (relative error 4.2e-7 on a 512-deep product, numpy's 2.8e-7); ``TF32_TF32_F32``
is refused on CPU. So on CPU this adapter passes the fp32 profile with the default precision
too, while the same code on a GPU with the default carries TF32 error, which the fp32 profile
rejects by design (spec/tolerance.yaml calibration variant fp32-tf32: >= 2200 x the fp32 noise)
and which is what the tf32 profile describes. To make the adapter mean the same thing on every
backend, every contraction passes ``precision=MATMUL_PRECISION`` = ``HIGHEST`` explicitly: fp32
is then the profile everywhere. bfloat16 operands are widened to float32 before a contraction
(exact: a product of two bf16 values fits in fp32; XLA:CPU has no bf16 x bf16 -> f32 dot), which
is what a tensor core's bf16 x bf16 + fp32 accumulate computes.

RoPE angles ``position * frequency`` are computed in float64 on the host (as a precomputed
cos/sin table would be) and only cos / sin are cast to the working precision. Angles computed
in float32, as the public PyTorch code does, are off by up to ~4e-3 rad at position 70000: the
fp32 profile then rejects the three YaRN prefill cases (100 x the allowed error at 70000, 13 x
at 5000-6000) while bf16 accepts them (spec/tolerance.yaml, acceptance derivation).
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mla_ref import Unsupported

PROFILES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16"}
DTYPE_NAME = os.environ.get("MLA_REF_JAX_DTYPE", "float32")
if DTYPE_NAME not in PROFILES:
    raise ValueError(f"MLA_REF_JAX_DTYPE: expected one of {sorted(PROFILES)}, got {DTYPE_NAME!r}")
if DTYPE_NAME == "float64":
    jax.config.update("jax_enable_x64", True)

PROFILE = PROFILES[DTYPE_NAME]
STORE = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[DTYPE_NAME]  # weights, activations
STAT = jnp.float64 if DTYPE_NAME == "float64" else jnp.float32  # logits, softmax, LSE, norm statistics, RoPE, router
INT = np.int64 if DTYPE_NAME == "float64" else np.int32
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Config:
    """The config fields this port reads (spec/config.yaml names); hashable, so jit takes it as a static argument."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float
    rope_scaling_type: str | None
    rope_factor: float
    original_max_position_embeddings: int
    max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    yarn_truncate: bool
    yarn_activation: str
    max_seq_len: int
    rope_layout: str
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str
    topk_method: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    group_score_rule: str | None
    group_mask_fill: str
    topk_norm_rule: str
    topk_norm_epsilon: float
    bias_update_speed: float
    aux_loss_alpha: float
    num_nextn_predict_layers: int
    mtp_concat_order: str
    mtp_hidden_source: str
    mtp_rope_position: str
    mtp_depths: int | None
    mtp_module_reuse: str

    @classmethod
    def from_dict(cls, config: dict) -> "Config":
        if config.get("index_topk") is not None:
            raise Unsupported("DeepSeek Sparse Attention (index_topk set, spec/dsa.yaml): this adapter's MLA is dense")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in config]
        if missing:
            raise ValueError(f"config: missing fields {missing}")
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_active(self) -> bool:
        return self.rope_scaling_type == "yarn" and (
            self.yarn_activation == "always" or self.max_seq_len > self.original_max_position_embeddings)

    @property
    def group_rule(self) -> str:
        return self.group_score_rule or ("top2_sum" if self.topk_method == "noaux_tc" else "max")

    @property
    def depths(self) -> int:
        """D: the MTP depths run (mtp_depths, else one per module)."""
        return self.mtp_depths or self.num_nextn_predict_layers

    def mtp_layer(self, k: int) -> int:
        """MTP.3 — the layer of depth k's module: module k, or modules 1 .. M in turn when reused."""
        module = k if self.mtp_module_reuse == "none" else 1 + (k - 1) % self.num_nextn_predict_layers
        return self.num_hidden_layers + module - 1

    @property
    def renormalise(self) -> bool:
        return self.norm_topk_prob if self.topk_norm_rule == "norm_topk_prob" else self.scoring_func == "sigmoid"


def _yarn_mscale(factor: float, coefficient: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * coefficient * math.log(factor) + 1.0


def softmax_scale(cfg: Config) -> float:
    """ROPE.4 — qk_head_dim^-0.5, times m^2 = mscale(s, mscale_all_dim)^2 under YaRN, on the whole logit."""
    scale = cfg.qk_head_dim ** -0.5
    return scale * _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2 if cfg.yarn_active else scale


def rope_amplitude(cfg: Config) -> float:
    """ROPE.4 — mscale(s, mscale) / mscale(s, mscale_all_dim) on cos and sin (1 for every released config)."""
    if not cfg.yarn_active:
        return 1.0
    return _yarn_mscale(cfg.rope_factor, cfg.mscale) / _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)


def rope_frequencies(cfg: Config) -> np.ndarray:
    """ROPE.1-ROPE.3 — theta^(-2j/d), blended towards /factor between the YaRN correction dims (float64, host)."""
    dim = cfg.qk_rope_head_dim
    j = np.arange(dim // 2, dtype=np.float64)
    base = cfg.rope_theta ** (-2.0 * j / dim)
    if not cfg.yarn_active:
        return base

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (2 * math.pi * rotations)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if high == low:
        high += 0.001
    interpolated = np.clip((j - low) / (high - low), 0.0, 1.0)  # 0: keep the frequency, 1: divide by the factor
    return base / cfg.rope_factor * interpolated + base * (1.0 - interpolated)


def rope_tables(cfg: Config, positions: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """ROPE.5 — cos / sin [..., d/2] for integer positions; angles in float64 on the host, then cast."""
    angle = np.asarray(positions, dtype=np.float64)[..., None] * rope_frequencies(cfg)  # [batch, seq, rope / 2]
    amplitude = rope_amplitude(cfg)
    return jnp.asarray(amplitude * np.cos(angle), STAT), jnp.asarray(amplitude * np.sin(angle), STAT)


# ---------------------------------------------------------------------------- small ops
def _wide(x):
    """bf16 operands as fp32 (exact; a product of two bf16 values is exact in fp32): XLA:CPU has no bf16 x bf16 -> f32 dot."""
    return x.astype(STAT) if x.dtype == jnp.bfloat16 else x


def _contract(subscripts: str, a, b, out=STORE):
    """einsum with wide accumulation and one rounding to ``out``."""
    return jnp.einsum(subscripts, _wide(a), _wide(b), precision=MATMUL_PRECISION, preferred_element_type=STAT).astype(out)


def _linear(x, weight):
    """``x @ weight.T`` (checkpoint layout [out, in])."""
    return _contract("...i,oi->...o", x, weight)


def rms_norm(x, weight, eps: float):
    """NORM.1 — x / sqrt(mean(x^2) + eps) * weight, statistic in STAT, one rounding."""
    wide = x.astype(STAT)
    return (wide * jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + eps) * weight.astype(STAT)).astype(STORE)


def apply_rope(x, cos, sin, layout: str):
    """ROPE.6 — rotate pairs (2j, 2j+1) (interleaved, the released checkpoints) or (j, j + d/2) (half)."""
    wide = x.astype(STAT)
    half = x.shape[-1] // 2
    if layout == "interleaved":
        first, second = wide[..., 0::2], wide[..., 1::2]
        rotated = jnp.stack([first * cos - second * sin, first * sin + second * cos], axis=-1).reshape(x.shape)
    else:
        first, second = wide[..., :half], wide[..., half:]
        rotated = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return rotated.astype(STORE)


def swiglu(x, gate_proj, up_proj, down_proj):
    """(silu(x W1^T) * x W3^T) W2^T, the product in STAT."""
    gate, up = _linear(x, gate_proj).astype(STAT), _linear(x, up_proj).astype(STAT)
    return _linear((jax.nn.silu(gate) * up).astype(STORE), down_proj)


_swiglu = jax.jit(swiglu)


def masked_softmax(logits, visible):
    """MLA.10 — probabilities over visible keys and the natural-log LSE; a row with no visible key: 0 and -inf."""
    masked = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(masked, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    exps = jnp.where(visible, jnp.exp(masked - peak), 0.0)
    total = jnp.sum(exps, axis=-1, keepdims=True)
    probs = exps / jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)[..., 0]
    return probs, lse


# ---------------------------------------------------------------------------- MLA
@partial(jax.jit, static_argnames=("scale", "value_width"))
def latent_attention(q_latent, key_rows, visible, scale: float, value_width: int):
    """MLA.14, MLA.10, MLA.15 — one shared 576-wide key per position, values = its first value_width columns."""
    logits = scale * _contract("bshc,btc->bhst", q_latent, key_rows, out=STAT)  # [batch, heads, seq, keys]
    probs, lse = masked_softmax(logits, visible[:, None])  # [batch, heads, seq, keys], [batch, heads, seq]
    out_latent = _contract("bhst,btc->bshc", probs.astype(STORE), key_rows[..., :value_width])  # [batch, seq, heads, dv]
    return logits, probs, lse, out_latent


@partial(jax.jit, static_argnames=("cfg",))
def _project(cfg: Config, w: dict, hidden, cos, sin):
    """MLA.1-MLA.5 — queries, the normalised latent, rotated q_pe / k_pe and the cache rows of the new tokens."""
    batch, seq, _ = hidden.shape
    heads, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    steps = {}
    if cfg.q_lora_rank:
        c_q = steps["MLA.1/c_q"] = rms_norm(_linear(hidden, w["q_a_proj.weight"]), w["q_a_layernorm.weight"], cfg.rms_norm_eps)
        q = _linear(c_q, w["q_b_proj.weight"])
    else:
        q = _linear(hidden, w["q_proj.weight"])
    q = q.reshape(batch, seq, heads, cfg.qk_head_dim)  # [batch, seq, heads, nope + rope], head-major rows
    steps["MLA.2/q_nope"], steps["MLA.2/q_pe_raw"] = q[..., :nope], q[..., nope:]
    kv_a = _linear(hidden, w["kv_a_proj_with_mqa.weight"])  # [batch, seq, kv_lora_rank + rope]
    kv_latent = steps["MLA.3/kv_latent"] = rms_norm(kv_a[..., :cfg.kv_lora_rank], w["kv_a_layernorm.weight"], cfg.rms_norm_eps)
    k_pe_raw = steps["MLA.3/k_pe_raw"] = kv_a[..., cfg.kv_lora_rank:]  # [batch, seq, rope], one per token
    steps["MLA.4/q_pe"] = apply_rope(steps["MLA.2/q_pe_raw"], cos[:, :, None], sin[:, :, None], cfg.rope_layout)
    k_pe = steps["MLA.4/k_pe"] = apply_rope(k_pe_raw, cos, sin, cfg.rope_layout)
    steps["MLA.5/rows"] = jnp.concatenate([kv_latent, k_pe], axis=-1)  # [batch, seq, kv_lora_rank + rope]
    return steps


@partial(jax.jit, static_argnames=("cfg",))
def _prefill(cfg: Config, w: dict, hidden, cos, sin):
    """MLA.1-MLA.12, naive form, causal among the given tokens."""
    batch, seq, _ = hidden.shape
    heads, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    steps = _project(cfg, w, hidden, cos, sin)
    kv = _linear(steps["MLA.3/kv_latent"], w["kv_b_proj.weight"]).reshape(batch, seq, heads, nope + cfg.v_head_dim)
    k_nope, value = steps["MLA.6/k_nope"], steps["MLA.6/value"] = kv[..., :nope], kv[..., nope:]
    k_pe = jnp.broadcast_to(steps["MLA.4/k_pe"][:, :, None], (batch, seq, heads, cfg.qk_rope_head_dim))
    q_full = steps["MLA.7/q_full"] = jnp.concatenate([steps["MLA.2/q_nope"], steps["MLA.4/q_pe"]], axis=-1)
    k_full = steps["MLA.7/k_full"] = jnp.concatenate([k_nope, k_pe], axis=-1)  # [batch, seq, heads, qk_head_dim]
    visible = steps["MLA.8/visible"] = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
    logits = steps["MLA.9/logits"] = softmax_scale(cfg) * _contract("bihd,bjhd->bhij", q_full, k_full, out=STAT)
    steps["MLA.10/probs"], steps["MLA.10/lse"] = masked_softmax(logits, visible[:, None])  # lse: [batch, heads, seq]
    attn = steps["MLA.11/attn"] = _contract("bhij,bjhd->bihd", steps["MLA.10/probs"].astype(STORE), value)  # [batch, seq, heads, v]
    steps["MLA.12/output"] = _linear(attn.reshape(batch, seq, heads * cfg.v_head_dim), w["o_proj.weight"])
    return steps


@partial(jax.jit, static_argnames=("cfg", "num_keys"))
def _extend(cfg: Config, w: dict, hidden, cos, sin, cache_rows, cache_lengths, query_lengths, num_keys: int):
    """MLA.1-MLA.5, MLA.18, MLA.8, MLA.13, MLA.14, MLA.10, MLA.15, MLA.16, MLA.12 — absorbed, after a latent prefix."""
    batch, seq, _ = hidden.shape
    heads, nope, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    real = jnp.arange(seq)[None, :] < query_lengths[:, None]  # [batch, seq]: False on right padding
    steps = _project(cfg, w, hidden, cos, sin)  # padded tokens are projected too, then never cached, seen or output
    new_rows = steps["rows"] = jnp.where(real[..., None], steps["MLA.5/rows"], 0)
    steps["MLA.18/lengths"] = cache_lengths + query_lengths
    # keys: the cached prefix, then the real new rows, then zeros
    j = jnp.arange(num_keys)[None, :]  # [1, keys]
    cached = jnp.take_along_axis(cache_rows, jnp.minimum(j, cache_rows.shape[1] - 1)[..., None], axis=1)
    fresh = jnp.take_along_axis(new_rows, jnp.clip(j - cache_lengths[:, None], 0, seq - 1)[..., None], axis=1)
    in_cache, held = j < cache_lengths[:, None], j < steps["MLA.18/lengths"][:, None]
    key_rows = jnp.where(in_cache[..., None], cached, jnp.where(held[..., None], fresh, 0))  # [batch, keys, rank + rope]
    visible = steps["MLA.8/visible"] = real[:, :, None] & (j[:, None, :] <= cache_lengths[:, None, None] + jnp.arange(seq)[None, :, None])
    w_kv = w["kv_b_proj.weight"].reshape(heads, nope + cfg.v_head_dim, rank)  # per head [k_nope rows | value rows]
    q_absorbed = steps["MLA.13/q_absorbed"] = _contract("bshd,hdc->bshc", steps["MLA.2/q_nope"], w_kv[:, :nope])
    q_latent = steps["MLA.13/q_latent"] = jnp.concatenate([q_absorbed, steps["MLA.4/q_pe"]], axis=-1)
    (steps["MLA.14/logits"], steps["MLA.10/probs"], steps["MLA.10/lse"],
     steps["MLA.15/out_latent"]) = latent_attention(q_latent, key_rows, visible, softmax_scale(cfg), rank)
    attn = steps["MLA.16/attn"] = _contract("bshc,hdc->bshd", steps["MLA.15/out_latent"], w_kv[:, nope:])
    output = _linear(attn.reshape(batch, seq, heads * cfg.v_head_dim), w["o_proj.weight"])
    steps["MLA.12/output"] = jnp.where(real[..., None], output, 0)
    return steps


@partial(jax.jit, static_argnames=("num_keys", "head_dim_v", "scale", "causal"))
def _paged_core(q, k_cache, block_table, cache_seqlens, num_keys: int, head_dim_v: int, scale: float, causal: bool):
    """MLA.19 then MLA.17: gather held rows only (others are NaN-poisoned and become 0 before any product)."""
    block_size = k_cache.shape[1]
    seq = q.shape[1]
    t = jnp.arange(num_keys)[None, :]  # [1, keys]
    held = t < cache_seqlens[:, None]  # [batch, keys]
    blocks = jnp.take_along_axis(block_table, jnp.broadcast_to(t // block_size, held.shape), axis=1)
    rows = k_cache[jnp.where(held, blocks, 0), t % block_size, 0]  # [batch, keys, width]
    key_rows = jnp.where(held[..., None], rows, 0)
    visible = jnp.broadcast_to(held[:, None, :], (held.shape[0], seq, num_keys))  # [batch, seq, keys]
    if causal:  # bottom-right: query i sees key j iff j <= cache_seqlens - seq + i
        visible = visible & (t[:, None, :] <= cache_seqlens[:, None, None] - seq + jnp.arange(seq)[None, :, None])
    logits, probs, lse, out = latent_attention(q, key_rows, visible, scale, head_dim_v)
    return {"MLA.19/key_rows": key_rows, "MLA.8/visible": visible, "MLA.14/logits": logits, "MLA.10/probs": probs,
            "MLA.10/lse": lse, "MLA.15/out_latent": out, "MLA.17/out": out, "MLA.17/lse": lse}


# ---------------------------------------------------------------------------- MoE
@partial(jax.jit, static_argnames=("cfg",))
def _route(cfg: Config, gate_weight, bias, hidden):
    """MOE.1-MOE.8 — fp32 router (HF3 / vLLM style), selection-only bias, group limit, top-k ties to the lower index."""
    tokens = hidden.shape[0]
    experts, groups, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    per_group = experts // groups
    logits = jnp.einsum("ti,ei->te", hidden.astype(STAT), gate_weight.astype(STAT), precision=MATMUL_PRECISION)
    scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
    selection = scores if bias is None else scores + bias.astype(STAT)  # the bias chooses, never weighs
    grouped = selection.reshape(tokens, groups, per_group)
    if cfg.group_rule == "max":
        group_scores = grouped.max(axis=-1)
    else:
        group_scores = jax.lax.top_k(grouped, min(2, per_group))[0].sum(axis=-1)  # a duplicated maximum counts twice
    ranked, order = jax.lax.top_k(group_scores, min(cfg.topk_group + 1, groups))
    kept_groups = order[:, :cfg.topk_group]
    group_margin = ranked[:, cfg.topk_group - 1] - ranked[:, cfg.topk_group] if cfg.topk_group < groups else jnp.full(tokens, jnp.inf, STAT)
    kept = jnp.zeros((tokens, groups), bool).at[jnp.arange(tokens)[:, None], kept_groups].set(True)
    fill = 0.0 if cfg.group_mask_fill == "zero" else -jnp.inf
    masked = jnp.where(jnp.repeat(kept, per_group, axis=1), selection, fill)
    top, ids = jax.lax.top_k(masked, min(k + 1, experts))
    expert_ids = ids[:, :k]
    if k < experts:
        expert_margin = jnp.where(jnp.isneginf(top[:, k]), jnp.inf, top[:, k - 1] - top[:, k])
    else:
        expert_margin = jnp.full(tokens, jnp.inf, STAT)
    weights = jnp.take_along_axis(scores, expert_ids, axis=1)
    if cfg.renormalise:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + cfg.topk_norm_epsilon)
    weights = weights * cfg.routed_scaling_factor
    steps = {"MOE.1/logits": logits, "MOE.2/scores": scores, "MOE.4/group_scores": group_scores,
             "MOE.5/kept_groups": kept_groups, "MOE.5/group_margin": group_margin, "MOE.6/masked": masked,
             "MOE.7/expert_ids": expert_ids, "MOE.7/expert_margin": expert_margin, "MOE.8/weights": weights}
    if bias is not None:
        steps["MOE.3/selection"] = selection
    return steps


@jax.jit
def _experts(hidden, expert_ids, weights, gate_proj, up_proj, down_proj):
    """MOE.9-MOE.10 — grouped GEMM over the (token, slot) assignments sorted by expert, then token, then slot."""
    tokens, k = expert_ids.shape
    experts = gate_proj.shape[0]
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # dispatch order (MOE.18)
    token, slot = order // k, order % k
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)

    def grouped(x, stacked):  # stacked [experts, out, in] in checkpoint layout
        return jax.lax.ragged_dot(_wide(x), _wide(jnp.swapaxes(stacked, 1, 2)), sizes, precision=MATMUL_PRECISION,
                                  preferred_element_type=STAT).astype(STORE)

    x = hidden[token]  # [tokens * k, hidden_size]
    act = (jax.nn.silu(grouped(x, gate_proj).astype(STAT)) * grouped(x, up_proj).astype(STAT)).astype(STORE)
    expert_out = grouped(act, down_proj)  # [tokens * k, hidden_size]
    scaled = weights[token, slot][:, None].astype(STAT) * expert_out.astype(STAT)
    routed = jnp.zeros((tokens, hidden.shape[1]), STAT).at[token].add(scaled).astype(STORE)
    return {"MOE.9/expert_out": expert_out, "MOE.10/routed": routed}


# ---------------------------------------------------------------------------- adapter plumbing
def _fail(entry: str, message: str):
    raise ValueError(f"{entry}: {message}")


def _floats(entry: str, name: str, array, shape: tuple) -> jax.Array:
    """A float input as STORE, after checking its shape (None = any size)."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        _fail(entry, f"{name}: expected a float array, got dtype {array.dtype}")
    if array.ndim != len(shape) or any(want is not None and want != got for want, got in zip(shape, array.shape)):
        expected = "[" + ", ".join("*" if want is None else str(want) for want in shape) + "]"
        _fail(entry, f"{name}: expected shape {expected}, got {tuple(array.shape)}")
    return jnp.asarray(array.astype(np.float64).astype(STORE))


def _ints(entry: str, name: str, array, shape: tuple) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "iu" or array.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, array.shape)):
        _fail(entry, f"{name}: expected integers of shape {list(shape)}, got {array.dtype} {tuple(array.shape)}")
    return array.astype(np.int64)


def _weights(entry: str, weights: dict, shapes: dict[str, tuple]) -> dict:
    out = {}
    for name, shape in shapes.items():
        if name not in weights:
            _fail(entry, f"weight {name} missing (have {sorted(weights)[:6]}...)")
        out[name] = _floats(entry, f"weight {name}", weights[name], shape)
    return out


def _attention_weights(entry: str, cfg: Config, weights: dict) -> dict:
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    shapes = {"kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, hidden),
              "kv_a_layernorm.weight": (cfg.kv_lora_rank,),
              "kv_b_proj.weight": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
              "o_proj.weight": (hidden, heads * cfg.v_head_dim)}
    if cfg.q_lora_rank:
        shapes.update({"q_a_proj.weight": (cfg.q_lora_rank, hidden), "q_a_layernorm.weight": (cfg.q_lora_rank,),
                       "q_b_proj.weight": (heads * cfg.qk_head_dim, cfg.q_lora_rank)})
    else:
        shapes["q_proj.weight"] = (heads * cfg.qk_head_dim, hidden)
    return _weights(entry, weights, shapes)


def _numpy(outputs: dict) -> dict:
    """JAX arrays -> NumPy: floats as float64, integers as int64, masks as bool."""
    converted = {}
    for name, value in outputs.items():
        value = np.asarray(value)
        if jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 (ml_dtypes) has numpy kind "V", not "f"
            value = value.astype(np.float64)
        elif value.dtype != bool:
            value = value.astype(np.int64)
        converted[name] = value
    return converted


def _check_positions(entry: str, cfg: Config, positions: np.ndarray):
    if positions.size and (positions.min() < 0 or positions.max() >= cfg.max_position_embeddings):
        _fail(entry, f"positions must lie in [0, {cfg.max_position_embeddings}), got {positions.min()} .. {positions.max()}")


# ---------------------------------------------------------------------------- adapter entry points
def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """MLA.17 — FlashMLA-layout latent attention over a paged cache."""
    entry = "latent_attention_core"
    q = np.asarray(q)
    if q.ndim != 4:
        _fail(entry, f"q: expected [batch, s_q, heads, width], got {q.shape}")
    batch, _, _, width = q.shape
    if np.asarray(k_cache).dtype == np.uint8:
        raise Unsupported("FlashMLA's FP8 cache (uint8 records, spec/fp8.yaml FP8.12) is not implemented in this port")
    cache = _floats(entry, "k_cache", np.asarray(k_cache), (None, None, 1, width))
    table = _ints(entry, "block_table", block_table, (batch, None))
    seqlens = _ints(entry, "cache_seqlens", cache_seqlens, (batch,))
    num_blocks, block_size = cache.shape[:2]
    if not 0 < int(head_dim_v) <= width:
        _fail(entry, f"head_dim_v: expected 1 .. {width}, got {head_dim_v}")
    if table.size and (table.min() < -1 or table.max() >= num_blocks):
        _fail(entry, f"block_table: entries must lie in [-1, {num_blocks}), got {table.min()} .. {table.max()}")
    if seqlens.size and (seqlens.min() < 0 or seqlens.max() > table.shape[1] * block_size):
        _fail(entry, f"cache_seqlens: expected 0 .. {table.shape[1] * block_size} (max_blocks x block_size), got {seqlens.tolist()}")
    for b, length in enumerate(seqlens):
        if (table[b, : -(-int(length) // block_size)] < 0).any():
            _fail(entry, f"block_table: sequence {b} holds {length} positions but has no block for some of them")
    num_keys = max(int(seqlens.max(initial=0)), 1)
    steps = _paged_core(_floats(entry, "q", q, q.shape), cache, jnp.asarray(table.astype(INT)), jnp.asarray(seqlens.astype(INT)),
                        num_keys, int(head_dim_v), float(softmax_scale), bool(causal))
    if int(seqlens.max(initial=0)) == 0:  # no key anywhere: intermediates would have a zero-length key axis
        steps = {name: steps[name] for name in ("MLA.17/out", "MLA.17/lse")}
    return _numpy({"out": steps["MLA.17/out"], "lse": steps["MLA.17/lse"], **steps})


def mla_prefill(config, weights, hidden, start_positions):
    """MLA.1-MLA.12 without a cache (naive form): token i of sequence b at start_positions[b] + i."""
    entry, cfg = "mla_prefill", Config.from_dict(config)
    x = _floats(entry, "hidden", hidden, (None, None, cfg.hidden_size))
    batch, seq, _ = x.shape
    starts = _ints(entry, "start_positions", start_positions, (batch,))
    positions = starts[:, None] + np.arange(seq)[None, :]  # [batch, seq]
    _check_positions(entry, cfg, positions)
    steps = _prefill(cfg, _attention_weights(entry, cfg, weights), x, *rope_tables(cfg, positions))
    return _numpy({"output": steps["MLA.12/output"], "lse": steps["MLA.10/lse"], **steps})


def mla_extend(config, weights, hidden, cache_rows, cache_lengths, query_lengths):
    """Chunked prefill, decode or verification after a latent prefix, in the absorbed form."""
    entry, cfg = "mla_extend", Config.from_dict(config)
    x = _floats(entry, "hidden", hidden, (None, None, cfg.hidden_size))
    batch, seq, _ = x.shape
    rows = _floats(entry, "cache_rows", cache_rows, (batch, None, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    lengths = _ints(entry, "cache_lengths", cache_lengths, (batch,))
    new = _ints(entry, "query_lengths", query_lengths, (batch,))
    if (lengths < 0).any() or (lengths > rows.shape[1]).any():
        _fail(entry, f"cache_lengths: expected 0 .. {rows.shape[1]} (cache_rows holds that many), got {lengths.tolist()}")
    if (new < 0).any() or (new > seq).any():
        _fail(entry, f"query_lengths: expected 0 .. {seq}, got {new.tolist()}")
    positions = lengths[:, None] + np.arange(seq)[None, :]
    _check_positions(entry, cfg, np.where(np.arange(seq)[None, :] < new[:, None], positions, 0))
    if rows.shape[1] == 0:
        rows = jnp.zeros((batch, 1, rows.shape[2]), STORE)
    num_keys = max(int((lengths + new).max(initial=0)), 1)
    steps = _extend(cfg, _attention_weights(entry, cfg, weights), x, *rope_tables(cfg, positions), rows,
                    jnp.asarray(lengths.astype(INT)), jnp.asarray(new.astype(INT)), num_keys)
    return _numpy({"output": steps["MLA.12/output"], "lse": steps["MLA.10/lse"], **steps})


def _gate(entry: str, cfg: Config, weights: dict):
    gate = _weights(entry, weights, {"mlp.gate.weight": (cfg.n_routed_experts, cfg.hidden_size)})["mlp.gate.weight"]
    bias = None
    if cfg.topk_method == "noaux_tc":
        if "mlp.gate.e_score_correction_bias" not in weights:
            _fail(entry, "weight mlp.gate.e_score_correction_bias missing (topk_method noaux_tc)")
        bias = np.asarray(weights["mlp.gate.e_score_correction_bias"], dtype=np.float64)
        if bias.shape != (cfg.n_routed_experts,) or not np.isfinite(bias).all():
            _fail(entry, f"weight mlp.gate.e_score_correction_bias: expected {cfg.n_routed_experts} finite values, got {bias.shape}")
        bias = jnp.asarray(bias, STAT)  # kept wide: a bf16 bias moves routing
    return gate, bias


def _validate_routing_config(entry: str, cfg: Config):
    if cfg.n_routed_experts % cfg.n_group or not 1 <= cfg.topk_group <= cfg.n_group:
        _fail(entry, f"config: n_group {cfg.n_group} must divide n_routed_experts {cfg.n_routed_experts}, topk_group {cfg.topk_group} <= n_group")
    if cfg.num_experts_per_tok > cfg.topk_group * (cfg.n_routed_experts // cfg.n_group):
        _fail(entry, f"config: num_experts_per_tok {cfg.num_experts_per_tok} exceeds the experts of the kept groups")


def moe_route(config, weights, hidden):
    """MOE.1-MOE.8 — expert ids in descending selection score (ties to the lower index) and their weights."""
    entry, cfg = "moe_route", Config.from_dict(config)
    _validate_routing_config(entry, cfg)
    x = _floats(entry, "hidden", hidden, (None, cfg.hidden_size))
    steps = _route(cfg, *_gate(entry, cfg, weights), x)
    return _numpy({"expert_ids": steps["MOE.7/expert_ids"], "weights": steps["MOE.8/weights"], **steps})


def _ffn(entry: str, cfg: Config, weights: dict, x, layer: int) -> dict:
    """MOE.1-MOE.13 on x [tokens, hidden_size]: the dense SwiGLU or routed experts plus shared experts; weights under mlp.*."""
    width = cfg.hidden_size
    if layer < cfg.first_k_dense_replace or layer % cfg.moe_layer_freq:
        names = {f"mlp.{p}.weight": (cfg.intermediate_size, width) for p in ("gate_proj", "up_proj")}
        names["mlp.down_proj.weight"] = (width, cfg.intermediate_size)
        output = _swiglu(x, *_weights(entry, weights, names).values())
        return {"output": output, "MOE.13/output": output}
    _validate_routing_config(entry, cfg)
    steps = _route(cfg, *_gate(entry, cfg, weights), x)
    needed = set(np.unique(np.asarray(steps["MOE.7/expert_ids"])).tolist())
    inner = cfg.moe_intermediate_size
    stacked = {part: [] for part in ("gate_proj", "up_proj", "down_proj")}
    for e in range(cfg.n_routed_experts):
        for part, shape in (("gate_proj", (inner, width)), ("up_proj", (inner, width)), ("down_proj", (width, inner))):
            name = f"mlp.experts.{e}.{part}.weight"
            if name in weights:
                stacked[part].append(_floats(entry, f"weight {name}", weights[name], shape))
            elif e in needed:
                _fail(entry, f"weight {name} missing (expert {e} received tokens)")
            else:
                stacked[part].append(jnp.zeros(shape, STORE))
    steps.update(_experts(x, steps["MOE.7/expert_ids"], steps["MOE.8/weights"], *(jnp.stack(v) for v in stacked.values())))
    output = steps["MOE.10/routed"]
    if cfg.n_shared_experts:
        inner = cfg.n_shared_experts * cfg.moe_intermediate_size
        names = {f"mlp.shared_experts.{p}.weight": (inner, width) for p in ("gate_proj", "up_proj")}
        names["mlp.shared_experts.down_proj.weight"] = (width, inner)
        shared = steps["MOE.11/shared"] = _swiglu(x, *_weights(entry, weights, names).values())
        output = (output.astype(STAT) + shared.astype(STAT)).astype(STORE)  # unweighted, after the routed sum
    steps["MOE.12/output"] = steps["output"] = output
    return steps


def moe_layer(config, weights, hidden, layer):
    """MOE.1-MOE.13 — the feed-forward block of ``layer``: dense SwiGLU or routed experts plus shared experts."""
    entry, cfg = "moe_layer", Config.from_dict(config)
    steps = _ffn(entry, cfg, weights, _floats(entry, "hidden", hidden, (None, cfg.hidden_size)), int(layer))
    if "MOE.7/expert_ids" in steps:
        steps["expert_ids"] = steps["MOE.7/expert_ids"]
    return _numpy(steps)


@partial(jax.jit, static_argnames=("cfg",))
def _balance(cfg: Config, scores, expert_ids, bias):
    """MOE.14-MOE.17 on whole sequences: scores [batch, seq, experts], expert_ids [batch, seq, k]."""
    batch, seq, experts = scores.shape
    k, devices, per_device = cfg.num_experts_per_tok, cfg.n_group, cfg.n_routed_experts // cfg.n_group
    chosen = jax.nn.one_hot(expert_ids, experts, dtype=STAT).sum(axis=2)  # [batch, seq, experts]: routing decisions
    load = jnp.bincount(expert_ids.reshape(-1), length=experts)
    new_bias = bias + cfg.bias_update_speed * jnp.sign(jnp.mean(load.astype(STAT)) - load)
    top_unbiased = jax.nn.one_hot(jax.lax.top_k(scores, k)[1], experts, dtype=STAT).sum(axis=2)
    f = experts / (k * seq) * top_unbiased.sum(axis=1)  # [batch, experts]
    p = (scores / scores.sum(axis=-1, keepdims=True)).mean(axis=1)
    sequence_loss = cfg.aux_loss_alpha * (f * p).sum(axis=-1)
    f_routed = experts / (k * seq) * chosen.sum(axis=1)
    p_raw = scores.mean(axis=1)  # [batch, experts]
    expert_loss = cfg.aux_loss_alpha * (f_routed * p_raw).sum(axis=-1)
    p_device = p_raw.reshape(batch, devices, per_device).sum(axis=-1)
    f_device = f_routed.reshape(batch, devices, per_device).mean(axis=-1)
    device_loss = 0.05 * (f_device * p_device).sum(axis=-1)
    sent = (chosen.reshape(batch, seq, devices, per_device).sum(axis=-1) > 0).astype(STAT)
    f_comm = devices / (cfg.topk_group * seq) * sent.sum(axis=1)
    comm_loss = 0.02 * (f_comm * p_device).sum(axis=-1)
    return {"load": load, "new_bias": new_bias, "sequence_loss": sequence_loss, "expert_loss": expert_loss,
            "device_loss": device_loss, "comm_loss": comm_loss, "MOE.14/load": load, "MOE.15/new_bias": new_bias,
            "MOE.16/loss": sequence_loss, "MOE.16/f": f, "MOE.16/p": p, "MOE.17/expert_loss": expert_loss,
            "MOE.17/device_loss": device_loss, "MOE.17/comm_loss": comm_loss}


def moe_balance(config, scores, expert_ids, bias):
    """MOE.14-MOE.17 — expert load, the bias update, the V3 sequence-wise loss and the V2 losses per sequence."""
    entry, cfg = "moe_balance", Config.from_dict(config)
    _validate_routing_config(entry, cfg)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[-1] != cfg.n_routed_experts:
        _fail(entry, f"scores: expected [batch, seq, {cfg.n_routed_experts}], got {scores.shape}")
    ids = _ints(entry, "expert_ids", expert_ids, scores.shape[:2] + (cfg.num_experts_per_tok,))
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.n_routed_experts):
        _fail(entry, f"expert_ids: expected 0 .. {cfg.n_routed_experts - 1}, got {ids.min()} .. {ids.max()}")
    bias = np.asarray(bias, dtype=np.float64)
    if bias.shape != (cfg.n_routed_experts,):
        _fail(entry, f"bias: expected [{cfg.n_routed_experts}], got {bias.shape}")
    return _numpy(_balance(cfg, jnp.asarray(scores, STAT), jnp.asarray(ids.astype(INT)), jnp.asarray(bias, STAT)))


@partial(jax.jit, static_argnames=("experts", "groups", "ranks"))
def _dispatch(expert_ids, experts: int, groups: int, ranks: int):
    """MOE.18 — entries (token, slot, expert) in expert, token, slot order; per-rank counts; groups reached per token."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    entries = jnp.stack([order // k, order % k, flat[order]], axis=1)
    counts = jnp.bincount(flat // (experts // ranks), length=ranks)
    reached = jax.nn.one_hot(expert_ids // (experts // groups), groups, dtype=jnp.int32).sum(axis=1) > 0
    groups_per_token = reached.sum(axis=-1)
    return {"entries": entries, "counts": counts, "groups_per_token": groups_per_token, "MOE.18/entries": entries,
            "MOE.18/counts": counts, "MOE.18/groups_per_token": groups_per_token}


def dispatch_plan(config, expert_ids, ranks):
    """MOE.18 — the expert-parallel dispatch plan for experts placed contiguously on ``ranks`` ranks."""
    entry, cfg = "dispatch_plan", Config.from_dict(config)
    ranks = int(ranks)
    if ranks < 1 or cfg.n_routed_experts % ranks:
        _fail(entry, f"ranks: expected a divisor of n_routed_experts {cfg.n_routed_experts}, got {ranks}")
    ids = _ints(entry, "expert_ids", expert_ids, (None, cfg.num_experts_per_tok))
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.n_routed_experts):
        _fail(entry, f"expert_ids: expected 0 .. {cfg.n_routed_experts - 1}, got {ids.min()} .. {ids.max()}")
    return _numpy(_dispatch(jnp.asarray(ids.astype(INT)), cfg.n_routed_experts, cfg.n_group, ranks))


# ---------------------------------------------------------------------------- decoder stack (MODEL) and MTP
def _add(a, b):
    """A residual add: in STAT, one rounding."""
    return (a.astype(STAT) + b.astype(STAT)).astype(STORE)


def _embed(entry: str, cfg: Config, weights: dict, tokens: np.ndarray, lengths: np.ndarray):
    """MODEL.1 — embedding rows of the real tokens, 0 for right padding (whose ids are never read)."""
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [batch, seq]
    bad = real & ((tokens < 0) | (tokens >= cfg.vocab_size))
    if bad.any():
        b, i = (int(v) for v in np.argwhere(bad)[0])
        _fail(entry, f"tokens: expected ids in 0 .. {cfg.vocab_size - 1} at real positions, got {tokens[b, i]} at [{b}, {i}]")
    table = _weights(entry, weights, {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)})["model.embed_tokens.weight"]
    ids = jnp.asarray(np.where(real, tokens, 0).astype(INT))
    return jnp.where(jnp.asarray(real)[..., None], table[ids], 0).astype(STORE)  # [batch, seq, hidden_size]


def _head(entry: str, cfg: Config, weights: dict, hidden, norm_name: str):
    """MODEL.4-MODEL.5 (MTP.4 with shared_head.norm) — RMSNorm, then the untied lm_head."""
    w = _weights(entry, weights, {norm_name: (cfg.hidden_size,), "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)})
    normed = rms_norm(hidden, w[norm_name], cfg.rms_norm_eps)
    return normed, _linear(normed, w["lm_head.weight"])  # [batch, seq, hidden_size], [batch, seq, vocab_size]


def _block(entry: str, cfg: Config, weights: dict, layer: int, x, positions: np.ndarray, cache_rows, cache_lengths: np.ndarray,
           query_lengths: np.ndarray):
    """MODEL.2-MODEL.3 — pre-norm MLA and FFN residuals of decoder layer ``layer`` (absorbed attention after cache_rows)."""
    prefix = f"model.layers.{layer}."
    own = {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}
    attention = {name[len("self_attn."):]: value for name, value in own.items() if name.startswith("self_attn.")}
    norms = _weights(entry, {prefix + n: v for n, v in own.items()},
                     {prefix + "input_layernorm.weight": (cfg.hidden_size,), prefix + "post_attention_layernorm.weight": (cfg.hidden_size,)})
    _check_positions(entry, cfg, np.where(np.arange(x.shape[1])[None, :] < query_lengths[:, None], positions, 0))
    attn = _extend(cfg, _attention_weights(entry, cfg, attention), rms_norm(x, norms[prefix + "input_layernorm.weight"], cfg.rms_norm_eps),
                   *rope_tables(cfg, positions), cache_rows, jnp.asarray(cache_lengths.astype(INT)),
                   jnp.asarray(query_lengths.astype(INT)), cache_rows.shape[1] + x.shape[1])
    after_attention = _add(x, attn["MLA.12/output"])
    ffn_in = rms_norm(after_attention, norms[prefix + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    ffn = _ffn(entry, cfg, own, ffn_in.reshape(-1, cfg.hidden_size), layer)["output"].reshape(x.shape)
    return after_attention, _add(after_attention, ffn), attn["rows"]


def _forward(entry: str, cfg: Config, weights: dict, tokens: np.ndarray, query_lengths: np.ndarray, caches=None,
             cache_lengths: np.ndarray | None = None) -> tuple[dict, list]:
    """MODEL.1-MODEL.5 on new tokens [batch, seq] after each layer's cached rows (None: no prefix); returns steps, new rows per layer."""
    batch, seq = tokens.shape
    cache_lengths = np.zeros(batch, np.int64) if cache_lengths is None else cache_lengths
    positions = cache_lengths[:, None] + np.arange(seq)[None, :]
    x = _embed(entry, cfg, weights, tokens, query_lengths)
    steps, written = {"MODEL.1/hidden": x}, []
    for layer in range(cfg.num_hidden_layers):
        rows = jnp.zeros((batch, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim), STORE) if caches is None else caches[layer]
        steps["MODEL.2/hidden"], x, new_rows = _block(entry, cfg, weights, layer, x, positions, rows, cache_lengths, query_lengths)
        written.append(new_rows)
    steps["MODEL.3/hidden"] = steps["pre_norm"] = x
    steps["MODEL.4/post_norm_hidden"], steps["MODEL.5/logits"] = _head(entry, cfg, weights, x, "model.norm.weight")
    return steps, written


def _append(caches: list, written: list, lengths: np.ndarray, counts: np.ndarray) -> list:
    """MLA.18 — write each layer's first counts[b] new rows at positions lengths[b] ..; returns the new caches."""
    updated = []
    for cache, rows in zip(caches, written):
        cache, rows = np.asarray(cache).copy(), np.asarray(rows)
        for b, (start, count) in enumerate(zip(lengths, counts)):
            cache[b, start:start + count] = rows[b, :count]
        updated.append(jnp.asarray(cache))
    return updated


def _cross_entropy(logits, targets: np.ndarray, normaliser: int):
    """MODEL.7 — -(1 / (batch * normaliser)) sum log softmax(logits)[target] over rows with a target >= 0."""
    log_probs = jax.nn.log_softmax(logits.astype(STAT), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.asarray(np.maximum(targets, 0).astype(INT))[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(jnp.asarray(targets >= 0), picked, 0.0)) / (targets.shape[0] * normaliser)


def _mtp_module(entry: str, cfg: Config, weights: dict, k: int, tokens: np.ndarray, previous, rows: np.ndarray):
    """MTP.2-MTP.4 for depth k on rows [batch, width]: row i < rows[b] combines Emb(tokens[b, i + k]) with previous[b, i]."""
    batch, width = previous.shape[:2]
    layer = cfg.mtp_layer(k)
    prefix = f"model.layers.{layer}."
    shifted = np.zeros((batch, width), np.int64)
    shifted[:, : max(tokens.shape[1] - k, 0)] = tokens[:, k:k + width]
    embedded = _embed(entry, cfg, weights, shifted, rows)  # Emb(t_{i+k})
    w = _weights(entry, weights, {prefix + "enorm.weight": (cfg.hidden_size,), prefix + "hnorm.weight": (cfg.hidden_size,),
                                  prefix + "eh_proj.weight": (cfg.hidden_size, 2 * cfg.hidden_size)})
    halves = [rms_norm(embedded, w[prefix + "enorm.weight"], cfg.rms_norm_eps), rms_norm(previous, w[prefix + "hnorm.weight"], cfg.rms_norm_eps)]
    if cfg.mtp_concat_order == "hidden_first":
        halves.reverse()
    real = jnp.asarray(np.arange(width)[None, :] < rows[:, None])[..., None]
    combined = jnp.where(real, _linear(jnp.concatenate(halves, axis=-1), w[prefix + "eh_proj.weight"]), 0)
    positions = np.arange(width)[None, :].repeat(batch, 0) + (k if cfg.mtp_rope_position == "token" else 0)
    empty = jnp.zeros((batch, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim), STORE)
    _, block_output, _ = _block(entry, cfg, weights, layer, combined, positions, empty, np.zeros(batch, np.int64), rows)
    hidden, logits = _head(entry, cfg, weights, block_output, prefix + "shared_head.norm.weight")
    return {"MTP.2/combined": combined, "MTP.3/block_output": block_output, "MTP.4/hidden": hidden, "MTP.4/logits": logits}


def model_logits(config, weights, tokens, query_lengths):
    """MODEL.1-MODEL.5 — logits of every position of right-padded token rows (padding gives 0)."""
    entry, cfg = "model_logits", Config.from_dict(config)
    tokens = _ints(entry, "tokens", tokens, (None, None))
    lengths = _ints(entry, "query_lengths", query_lengths, (tokens.shape[0],))
    if (lengths < 0).any() or (lengths > tokens.shape[1]).any():
        _fail(entry, f"query_lengths: expected 0 .. {tokens.shape[1]}, got {lengths.tolist()}")
    steps, _ = _forward(entry, cfg, weights, tokens, lengths)
    steps.pop("pre_norm")
    return _numpy({"logits": steps["MODEL.5/logits"], **steps})


def greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps):
    """MODEL.6 — prefill ragged prompts into per-layer latent caches, then ``steps`` greedy tokens (ties to the lowest id)."""
    entry, cfg = "greedy_decode", Config.from_dict(config)
    prompts = _ints(entry, "prompt_tokens", prompt_tokens, (None, None))
    batch = prompts.shape[0]
    lengths = _ints(entry, "prompt_lengths", prompt_lengths, (batch,))
    steps = int(steps)
    if steps < 1 or (lengths < 1).any() or (lengths > prompts.shape[1]).any():
        _fail(entry, f"expected steps >= 1 and prompt_lengths in 1 .. {prompts.shape[1]}, got {steps}, {lengths.tolist()}")
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    caches = [jnp.zeros((batch, prompts.shape[1] + steps, width), STORE) for _ in range(cfg.num_hidden_layers)]
    out, written = _forward(entry, cfg, weights, prompts, lengths, caches, np.zeros(batch, np.int64))
    caches, cached = _append(caches, written, np.zeros(batch, np.int64), lengths), lengths.copy()
    last = out["MODEL.5/logits"][jnp.arange(batch), jnp.asarray(lengths - 1)]  # [batch, vocab]
    chosen, chosen_logits = [], []
    for step in range(steps):
        if step:
            out, written = _forward(entry, cfg, weights, chosen[-1][:, None], np.ones(batch, np.int64), caches, cached)
            caches, cached = _append(caches, written, cached, np.ones(batch, np.int64)), cached + 1
            last = out["MODEL.5/logits"][:, 0]
        chosen.append(np.asarray(jnp.argmax(last.astype(STAT), axis=-1)).astype(np.int64))  # first maximum: lowest id
        chosen_logits.append(last)
    out.pop("pre_norm")
    return _numpy({"tokens": np.stack(chosen, axis=1), "logits": jnp.stack(chosen_logits, axis=1), **out,
                   "MODEL.6/next_token": chosen[-1]})


def mtp_forward(config, weights, tokens, mtp_lambda):
    """MTP.1-MTP.6 — the main forward, the D chained MTP modules, per-depth logits and losses, L_MTP and the main loss."""
    entry, cfg = "mtp_forward", Config.from_dict(config)
    tokens = _ints(entry, "tokens", tokens, (None, None))
    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    depths = cfg.depths
    if depths < 1 or seq <= depths:
        _fail(entry, f"expected num_nextn_predict_layers >= 1 and tokens longer than depths + 1, got {depths}, {tokens.shape}")
    main, _ = _forward(entry, cfg, weights, tokens[:, :seq], np.full(batch, seq))
    steps = {"MODEL.1/hidden": main["MODEL.1/hidden"], "MODEL.5/logits": main["MODEL.5/logits"],
             "MODEL.7/loss": _cross_entropy(main["MODEL.5/logits"], tokens[:, 1:], seq)}
    hidden = steps["MTP.1/h0"] = main["MODEL.4/post_norm_hidden"] if cfg.mtp_hidden_source == "post_norm" else main["pre_norm"]
    depth_logits, depth_losses = [], []
    for k in range(1, depths + 1):
        rows = np.full(batch, seq - k)
        module = _mtp_module(entry, cfg, weights, k, tokens, hidden, rows)  # rows padded to seq; row i < seq - k real
        targets = np.where(np.arange(seq)[None, :] < seq - k, np.pad(tokens[:, k + 1:], ((0, 0), (0, k))), -1)  # t_{i+k+1}
        depth_losses.append(_cross_entropy(module["MTP.4/logits"], targets, seq))
        depth_logits.append(module["MTP.4/logits"])
        hidden = module["MTP.4/hidden"]  # h^k feeds depth k + 1
        steps.update({name: value[:, : seq - k] for name, value in module.items()})
    steps["MTP.5/loss"] = depth_losses[-1]
    losses = jnp.stack(depth_losses)
    steps["MTP.6/loss"] = float(mtp_lambda) / depths * losses.sum()
    return _numpy({"main_logits": main["MODEL.5/logits"], "depth_logits": jnp.stack(depth_logits), "main_loss": steps["MODEL.7/loss"],
                   "depth_losses": losses, "mtp_loss": steps["MTP.6/loss"], **steps})


def _draft(entry: str, cfg: Config, weights: dict, history: np.ndarray, hidden, known: np.ndarray, depths: int):
    """MTP.7 — the D drafts after t_0 .. t_n (n + 1 = known), h^0 of rows 0 .. n - 1 given: the history with d_1 .. d_D
    written after t_n, and the logits [batch, D, vocab] each draft came from.

    Chained depths run over rows 0 .. n - 1; with recurrent reuse, steps 2 .. D rerun module 1 one row longer each,
    the new row joining the h its predecessor produced with Emb(d_{k-1}).
    """
    batch, rows = history.shape[0], jnp.arange(history.shape[0])
    extended = np.concatenate([history, np.zeros((batch, depths + 1), np.int64)], axis=1)  # t_{n + j} = d_j
    fed, chosen = hidden, []  # recurrent reuse: h^0 rows, then the h each extra step feeds back
    chained = 1 if cfg.mtp_module_reuse == "recurrent" else depths
    for k in range(1, chained + 1):  # rows 0 .. known - 2
        module = _mtp_module(entry, cfg, weights, k, extended, hidden, known - 1)
        chosen.append(module["MTP.4/logits"][rows, jnp.asarray(known - 2)])
        extended[np.arange(batch), known + k - 1] = np.asarray(jnp.argmax(chosen[-1].astype(STAT), -1))
        hidden = module["MTP.4/hidden"]
    for step in range(1, depths - chained + 1):  # recurrent: module 1 once more, one row longer: Emb(d_step), fed-back h
        fed = fed.at[rows, jnp.asarray(known - 2 + step)].set(hidden[rows, jnp.asarray(known - 3 + step)])
        module = _mtp_module(entry, cfg, weights, 1, extended, fed, known - 1 + step)
        chosen.append(module["MTP.4/logits"][rows, jnp.asarray(known - 2 + step)])
        extended[np.arange(batch), known + step] = np.asarray(jnp.argmax(chosen[-1].astype(STAT), -1))
        hidden = module["MTP.4/hidden"]
    return extended[:, : history.shape[1]], jnp.stack(chosen, axis=1)


def mtp_draft(config, weights, prompt_tokens, prompt_lengths):
    """MTP.7 — one drafting step after the known tokens t_0 .. t_n: drafts [batch, D] and the logits [batch, D, vocab] they came from."""
    entry, cfg = "mtp_draft", Config.from_dict(config)
    tokens = _ints(entry, "prompt_tokens", prompt_tokens, (None, None))
    batch = tokens.shape[0]
    lengths = _ints(entry, "prompt_lengths", prompt_lengths, (batch,))
    depths = cfg.depths
    if depths < 1 or (lengths < 2).any() or (lengths > tokens.shape[1]).any():
        _fail(entry, f"expected num_nextn_predict_layers >= 1 and prompt_lengths in 2 .. {tokens.shape[1]}, got {lengths.tolist()}")
    width = tokens.shape[1] + depths + 1
    history = np.zeros((batch, width), np.int64)
    history[:, : tokens.shape[1]] = tokens
    main, _ = _forward(entry, cfg, weights, history, lengths - 1)  # h^0 of positions 0 .. n - 1
    source = "MODEL.4/post_norm_hidden" if cfg.mtp_hidden_source == "post_norm" else "pre_norm"
    extended, logits = _draft(entry, cfg, weights, history, main[source], lengths, depths)
    drafts = extended[np.arange(batch)[:, None], lengths[:, None] + np.arange(depths)[None, :]]  # [batch, depths]
    return _numpy({"drafts": drafts, "logits": logits, "MTP.7/drafts": drafts})


def speculative_decode(config, weights, prompt_tokens, prompt_lengths, steps):
    """MTP.7-MTP.11 — greedy speculative decoding, the D MTP modules drafting, one verification forward of D + 1 tokens per step.

    Uncached on purpose (every forward recomputes its whole prefix at one padded width, so XLA compiles once):
    the drafts equal the cached drafter's, the emitted tokens plain greedy decoding's.
    """
    entry, cfg = "speculative_decode", Config.from_dict(config)
    prompts = _ints(entry, "prompt_tokens", prompt_tokens, (None, None))
    batch = prompts.shape[0]
    lengths = _ints(entry, "prompt_lengths", prompt_lengths, (batch,))
    steps, depths = int(steps), cfg.depths
    if steps < 1 or depths < 1 or (lengths < 1).any() or (lengths > prompts.shape[1]).any():
        _fail(entry, f"expected steps >= 1, num_nextn_predict_layers >= 1, prompt_lengths in 1 .. {prompts.shape[1]}")
    width = prompts.shape[1] + steps + 2 * depths + 1
    history = np.zeros((batch, width), np.int64)
    history[:, : prompts.shape[1]] = prompts
    main, _ = _forward(entry, cfg, weights, history, lengths)
    history[np.arange(batch), lengths] = np.asarray(jnp.argmax(main["MODEL.5/logits"][jnp.arange(batch), jnp.asarray(lengths - 1)].astype(STAT), -1))
    known, emitted = lengths + 1, np.ones(batch, np.int64)
    source = "MODEL.4/post_norm_hidden" if cfg.mtp_hidden_source == "post_norm" else "pre_norm"
    accepted_per_depth, proposed_per_depth = np.zeros(depths, np.int64), np.zeros(depths, np.int64)
    while (active := emitted < steps).any():
        extended, _ = _draft(entry, cfg, weights, history, main[source], known, depths)  # MTP.7
        drafts = extended[np.arange(batch)[:, None], known[:, None] + np.arange(depths)[None, :]]  # [batch, depths]
        main, _ = _forward(entry, cfg, weights, extended, known + depths)  # MTP.8: t_0 .. t_n, d_1 .. d_D
        at = jnp.asarray(known[:, None] - 1 + np.arange(depths + 1)[None, :])
        greedy = np.asarray(jnp.argmax(jnp.take_along_axis(main["MODEL.5/logits"], at[..., None], axis=1).astype(STAT), -1))
        accepted = np.where(active, np.cumprod(drafts == greedy[:, :-1], axis=1).sum(axis=1), 0)  # MTP.9
        counts = np.where(active, accepted + 1, 0)  # emits g_0 .. g_a
        for b in range(batch):
            history[b, known[b]:known[b] + counts[b]] = greedy[b, :counts[b]]
        known, emitted = known + counts, emitted + counts
        accepted_per_depth += (active[:, None] & (accepted[:, None] >= np.arange(1, depths + 1)[None, :])).sum(axis=0)  # MTP.11
        proposed_per_depth += int(active.sum())
    tokens = history[np.arange(batch)[:, None], lengths[:, None] + np.arange(steps)[None, :]]
    return _numpy({"tokens": tokens, "accepted_per_depth": accepted_per_depth, "proposed_per_depth": proposed_per_depth,
                   "MTP.7/drafts": drafts, "MTP.9/accepted": accepted, "MTP.10/lengths": known - 1,
                   "MTP.11/accepted_per_depth": accepted_per_depth, "MTP.11/proposed_per_depth": proposed_per_depth})
