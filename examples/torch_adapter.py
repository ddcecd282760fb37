"""A compact PyTorch MLA / DeepSeek-MoE layer behind the adapter protocol of spec/golden.yaml.

Written the way an inference engine writes it, independently of mla_ref: weights and
activations in one dtype, attention logits, softmax, LSE and the router in fp32 (float64
in float64 mode), interleaved-pair RoPE through complex numbers, prefill in the naive form
(per-head keys and values), cached extension in the absorbed form against latent rows
``[normalised latent | rotated k_pe]``, the FlashMLA-layout kernel over a paged cache,
FlashMLA's sparse decode and prefill kernels (DSA.13, DSA.14), and the indexer's FP8 key cache
as vLLM writes it and DeepGEMM's paged logits read it (DSA.15-DSA.18).
A DeepSeek-V3.2 config (``index_topk`` set) adds the lightning indexer (its own NeoX RoPE on the
first rope dims, a Sylvester Hadamard, ReLU before the signed head weights, causal top-k; no FP8)
and sparse attention: the naive prefill masks out the unselected keys, the cached path gathers
only the selected latent rows; in mode ``fp8``, with kv_lora_rank a multiple of 128, the cached
path holds the latent rows (prefix and new tokens) as V3.2's FP8 records (ue8m0 scales) and reads
them decoded, as V3.2 deploys its cache.

The precision is the one setting the protocol's arguments do not carry, so it is a module
setting: ``configure(dtype, device, tf32, rope_table)``, or at import the environment variables
``MLA_REF_TORCH_DTYPE`` (float64 | float32 | bfloat16 | float16 | fp8, default float32),
``MLA_REF_TORCH_DEVICE`` (default cpu), ``MLA_REF_TORCH_TF32=1`` (TF32 matmuls on CUDA) and
``MLA_REF_TORCH_ROPE_TABLE`` (float32 | float64: the dtype of the RoPE table; default float32, as
Hugging Face, DeepSeek's inference code and vLLM build it, and float64 in float64 mode).
``PROFILE`` names the matching precision profile of spec/tolerance.yaml. An FP8 checkpoint
(uint8 e4m3fn codes with ``{name}_scale_inv``) is dequantised in every mode; in mode ``fp8``
(profile fp8) its linear layers instead run as DeepSeek's kernels run them, written in torch:
activations quantised in 1 x 128 groups (``MLA_REF_TORCH_SCALE_FMT=ue8m0`` for power-of-two
scales), a GEMM per 128-wide K block in fp32 scaled by both scales, bf16 output; everything
else as bfloat16. Every entry point
also returns intermediates under ``<STEP>/<name>`` so the checker can name the first step
that diverges.

    mla-ref check examples/torch_adapter.py --profile fp32
    MLA_REF_TORCH_DTYPE=bfloat16 mla-ref check examples/torch_adapter.py --profile bf16
    MLA_REF_TORCH_DTYPE=fp8 mla-ref check examples/torch_adapter.py --profile fp8
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from mla_ref import Unsupported

PROFILES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8": "fp8"}
DTYPE, DEVICE, TF32, PROFILE, ROPE_TABLE = "float32", "cpu", False, "fp32", "float32"
SCALE_FMT = os.environ.get("MLA_REF_TORCH_SCALE_FMT") or None  # None: amax / 448; "ue8m0": rounded up to a power of two


def configure(dtype: str = "float32", device: str = "cpu", tf32: bool = False, rope_table: str | None = None) -> None:
    """Choose the dtype and device of every later call; sets PROFILE (tf32 only for float32 on CUDA).

    ``rope_table``: the dtype the cos / sin table is built in (inverse frequencies, ``position * freq``,
    cos and sin); default float32 like the public engines, float64 in float64 mode.
    """
    global DTYPE, DEVICE, TF32, PROFILE, ROPE_TABLE
    if dtype not in PROFILES:
        raise ValueError(f"MLA_REF_TORCH_DTYPE: expected one of {sorted(PROFILES)}, got {dtype!r}")
    rope_table = rope_table or ("float64" if dtype == "float64" else "float32")
    if rope_table not in ("float32", "float64"):
        raise ValueError(f"MLA_REF_TORCH_ROPE_TABLE: expected float32 or float64, got {rope_table!r}")
    DTYPE, DEVICE, TF32, ROPE_TABLE = dtype, device, bool(tf32 and dtype == "float32" and device.startswith("cuda")), rope_table
    PROFILE = "tf32" if TF32 else PROFILES[dtype]
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = TF32
        torch.backends.cudnn.allow_tf32 = TF32


configure(os.environ.get("MLA_REF_TORCH_DTYPE", "float32"), os.environ.get("MLA_REF_TORCH_DEVICE", "cpu"),
          os.environ.get("MLA_REF_TORCH_TF32", "0") == "1", os.environ.get("MLA_REF_TORCH_ROPE_TABLE"))


def _dtype() -> torch.dtype:
    """Storage dtype of weights and activations (bfloat16 in fp8 mode, as DeepSeek's FP8 inference keeps them)."""
    return torch.bfloat16 if DTYPE == "fp8" else getattr(torch, DTYPE)


def _stat() -> torch.dtype:
    """Dtype of logits, softmax, LSE, norms' statistics and the router: fp32, float64 in float64 mode."""
    return torch.float64 if DTYPE == "float64" else torch.float32


def _t(array, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), device=DEVICE).to(_dtype() if dtype is None else dtype)


def _ints(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=torch.int64, device=DEVICE)


def _np(outputs: dict) -> dict:
    """Torch tensors -> NumPy: floats as float64, integers as int64."""
    return {name: value.detach().cpu().to(torch.float64 if value.is_floating_point() else torch.int64).numpy()
            for name, value in outputs.items()}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """NORM.1 — ``x / sqrt(mean(x^2) + eps) * weight``, statistic and product in fp32, one rounding."""
    xf = x.to(_stat())
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(_stat())).to(x.dtype)


# ---------------------------------------------------------------------------- FP8 checkpoints

BLOCK = 128  # weights in 128 x 128 blocks, activations in 1 x 128 groups
FP8_MAX = 448.0


def e4m3(values: torch.Tensor) -> torch.Tensor:
    """float32 values to e4m3fn, clamped to +-448 first as DeepSeek's writers do (torch's eager cast before 2.12 gives NaN
    past 464; 2.12 saturates)."""
    return values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


class Fp8Weight:
    """A weight of an FP8 checkpoint: e4m3fn codes ``[N, K]`` and one float32 scale per 128 x 128 block."""

    def __init__(self, codes, scale_inv):
        self.codes = torch.as_tensor(np.asarray(codes), device=DEVICE).view(torch.float8_e4m3fn)
        self.scale = torch.as_tensor(np.asarray(scale_inv), device=DEVICE).to(torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """``code * scale_inv`` of the code's block (multiplied, despite the name), edge blocks cut to the weight."""
        rows, columns = self.codes.shape
        scale = self.scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :columns]  # [N, K]
        return (self.codes.to(torch.float64) * scale.to(torch.float64)).to(dtype)


def tensor(weights: dict, name: str):
    """One tensor of a NumPy checkpoint: an FP8 weight (uint8 codes with ``{name}_scale_inv``) as an Fp8Weight in fp8 mode,
    dequantised in the others; any other tensor in the storage dtype."""
    if name + "_scale_inv" not in weights:
        return _t(weights[name])
    weight = Fp8Weight(weights[name], weights[name + "_scale_inv"])
    return weight if DTYPE == "fp8" else weight.dequantized(_dtype())


def checkpoint(weights: dict) -> dict:
    """Every tensor of a NumPy checkpoint by :func:`tensor` (scales go with their weights)."""
    return {name: tensor(weights, name) for name in weights if not name.endswith("_scale_inv")}


def dense(weight) -> torch.Tensor:
    """A weight as a tensor; an FP8 one dequantised in fp32 and stored in bf16, as V3's weight_dequant gives it."""
    return weight.dequantized(torch.float32).to(_dtype()) if isinstance(weight, Fp8Weight) else weight


def ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """A positive float32 scale rounded up to a power of two."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))


def act_quant(x: torch.Tensor):
    """1 x 128 groups of the last dimension: ``s = max(amax, 1e-4) / 448`` (V3.2: times the float32 reciprocal), codes of x / s."""
    groups = x.to(torch.float32).unflatten(-1, (-1, BLOCK))  # [rows, K / 128, 128]
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)  # [rows, K / 128, 1]
    scale = amax * (1.0 / FP8_MAX)
    scale = ue8m0(scale) if SCALE_FMT == "ue8m0" else scale
    codes = e4m3(groups / scale)
    return codes.flatten(-2), scale.squeeze(-1)  # [rows, K], [rows, K / 128]


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """``a @ W.T`` per 128-wide K block: an fp32 partial product scaled by both scales, accumulated in fp32, bf16 output."""
    rows = torch.arange(weight.codes.shape[0], device=weight.codes.device) // BLOCK  # each output row's scale block
    b, b_scale = weight.codes.to(torch.float32), weight.scale[rows]  # [N, K], [N, K / 128]
    a = a.to(torch.float32)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)  # [rows, N]
    for block in range(b_scale.shape[1]):
        k = slice(block * BLOCK, (block + 1) * BLOCK)
        out += (a[:, k] @ b[:, k].T) * (a_scale[:, block, None] * b_scale[None, :, block])
    return out.to(torch.bfloat16)


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """``x @ W.T``; an FP8 weight through act_quant and the block-scaled FP8 GEMM (DeepSeek-V3.2 ``linear``)."""
    if not isinstance(weight, Fp8Weight):
        return F.linear(x, weight)
    codes, scale = act_quant(x.flatten(0, -2))
    return fp8_gemm(codes, scale, weight).unflatten(0, x.shape[:-1]).to(_dtype())


# ---------------------------------------------------------------------------- RoPE / YaRN

def yarn_active(cfg: dict) -> bool:
    """CONFIG yarn_active — YaRN always when configured, or only when max_seq_len exceeds the original context (OFF)."""
    if cfg["rope_scaling_type"] != "yarn":
        return False
    return cfg["yarn_activation"] == "always" or cfg["max_seq_len"] > cfg["original_max_position_embeddings"]


def yarn_mscale(factor: float, mscale: float) -> float:
    """ROPE.4 — YaRN magnitude ``0.1 * mscale * ln(factor) + 1``."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(cfg: dict, rotations: float) -> float:
    """ROPE.2 — the rope dim whose wavelength fits ``rotations`` times into the original context."""
    ratio = cfg["original_max_position_embeddings"] / (rotations * 2 * math.pi)
    return cfg["qk_rope_head_dim"] * math.log(ratio) / (2 * math.log(cfg["rope_theta"]))


def rope_frequencies(cfg: dict, dtype: torch.dtype) -> torch.Tensor:
    """ROPE.1-ROPE.3 — base frequencies, blended towards ``freq / factor`` by the YaRN ramp, every operation in ``dtype``."""
    dim = cfg["qk_rope_head_dim"]
    freqs = 1.0 / cfg["rope_theta"] ** (torch.arange(0, dim, 2, dtype=dtype) / dim)  # [rope_half]
    if yarn_active(cfg):
        low, high = _correction_dim(cfg, cfg["beta_fast"]), _correction_dim(cfg, cfg["beta_slow"])
        if cfg["yarn_truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / ((high - low) or 0.001)).clamp(0, 1)
        freqs = freqs / cfg["rope_factor"] * ramp + freqs * (1 - ramp)
    return freqs


def attention_scale(cfg: dict) -> float:
    """ROPE.4 — ``qk_head_dim^-0.5``, times ``m^2`` (m from mscale_all_dim) under YaRN, on the whole logit."""
    base = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    m = yarn_mscale(cfg["rope_factor"], cfg["mscale_all_dim"]) if yarn_active(cfg) else 1.0
    return base * m * m


def rope_cis(cfg: dict, positions: torch.Tensor) -> torch.Tensor:
    """ROPE.5 — ``amplitude * exp(i * position * freq)``: angles in the table dtype, stored as complex of the stat dtype."""
    amplitude = 1.0
    if yarn_active(cfg):
        amplitude = yarn_mscale(cfg["rope_factor"], cfg["mscale"]) / yarn_mscale(cfg["rope_factor"], cfg["mscale_all_dim"])
    table = getattr(torch, ROPE_TABLE)
    angles = positions.to(table)[..., None] * rope_frequencies(cfg, table).to(positions.device)  # [batch, seq, rope_half]
    cis = torch.polar(torch.full_like(angles, amplitude), angles)
    return cis.to(torch.complex128 if _stat() == torch.float64 else torch.complex64)


def rotate(x: torch.Tensor, cis: torch.Tensor, layout: str) -> torch.Tensor:
    """ROPE.6 — rotate pairs: interleaved ``(2j, 2j+1)`` as complex numbers, or ``half`` ``(j, j + d/2)``."""
    xf = x.to(cis.real.dtype)
    if layout == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cis.real - x2 * cis.imag, x1 * cis.imag + x2 * cis.real], dim=-1).to(x.dtype)
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)).contiguous())  # [..., rope_half]
    return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------- MLA

def query_input(cfg: dict, w: dict, x: torch.Tensor, eps: float, steps: dict) -> torch.Tensor:
    """MLA.1 — the query latent ``c_q`` after q_a_layernorm (MLA's queries and the DSA indexer read it); ``x`` without q_lora_rank."""
    if not cfg["q_lora_rank"]:
        return x
    c_q = steps["MLA.1/c_q"] = rms_norm(linear(x, w["q_a_proj.weight"]), w["q_a_layernorm.weight"], eps)
    return c_q  # [batch, seq, q_lora_rank]


def project(cfg: dict, w: dict, x: torch.Tensor, positions: torch.Tensor, steps: dict):
    """MLA.1-MLA.5 — query input, queries, normalised latent and rotated k_pe of the new tokens."""
    heads, nope, rope, rank = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["kv_lora_rank"]
    eps = cfg["rms_norm_eps"]
    c_q = query_input(cfg, w, x, eps, steps)
    q = linear(c_q, w["q_b_proj.weight"] if cfg["q_lora_rank"] else w["q_proj.weight"])  # [batch, seq, heads * qk_head_dim]
    q_nope, q_pe = q.unflatten(-1, (heads, nope + rope)).split([nope, rope], dim=-1)  # [batch, seq, heads, nope | rope]
    kv_a = linear(x, w["kv_a_proj_with_mqa.weight"])  # [batch, seq, kv_lora_rank + rope]
    c_kv, k_pe = kv_a.split([rank, rope], dim=-1)
    kv_latent = rms_norm(c_kv, w["kv_a_layernorm.weight"], eps)  # [batch, seq, kv_lora_rank]
    steps.update({"MLA.2/q_nope": q_nope, "MLA.2/q_pe_raw": q_pe, "MLA.3/kv_latent": kv_latent, "MLA.3/k_pe_raw": k_pe})
    cis = rope_cis(cfg, positions)  # [batch, seq, rope_half]
    q_pe = steps["MLA.4/q_pe"] = rotate(q_pe, cis[:, :, None], cfg["rope_layout"])  # per head
    k_pe = steps["MLA.4/k_pe"] = rotate(k_pe, cis, cfg["rope_layout"])  # one per token, shared by the heads
    rows = steps["MLA.5/rows"] = torch.cat([kv_latent, k_pe], dim=-1)  # [batch, seq, kv_lora_rank + rope]
    return c_q, q_nope, q_pe, kv_latent, k_pe, rows


def causal_visible(key_offsets: torch.Tensor, query_lengths: torch.Tensor, seq: int, keys: int) -> torch.Tensor:
    """MLA.8 — bottom-right causal mask ``j <= offset + i`` for real (unpadded) queries: ``[batch, seq, keys]``."""
    i = torch.arange(seq, device=key_offsets.device)[None, :, None]
    j = torch.arange(keys, device=key_offsets.device)[None, None, :]
    return (i < query_lengths[:, None, None]) & (j <= key_offsets[:, None, None] + i)


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor):
    """MLA.10 — softmax over visible keys and its natural-log LSE; a row with no visible key: p = 0, lse = -inf."""
    scores = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [batch, heads, seq]
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)  # empty rows: NaN -> 0
    return probs, lse


def latent_attention(q_latent: torch.Tensor, key_rows: torch.Tensor, visible: torch.Tensor, scale: float, head_dim_v: int, steps: dict):
    """MLA.14 -> MLA.10 -> MLA.15 — MQA of per-head latent queries against shared latent rows."""
    key_rows = key_rows.masked_fill(~visible.any(1)[..., None], 0.0)  # keys no query sees are never used (may be NaN)
    logits = scale * torch.einsum("bshc,btc->bhst", q_latent.to(_stat()), key_rows.to(_stat()))  # [batch, heads, seq, keys]
    probs, lse = masked_softmax(logits, visible[:, None])
    out_latent = torch.einsum("bhst,btc->bshc", probs.to(key_rows.dtype), key_rows[..., :head_dim_v])  # [batch, seq, heads, v]
    steps.update({"MLA.14/logits": logits, "MLA.10/probs": probs, "MLA.10/lse": lse, "MLA.15/out_latent": out_latent})
    return out_latent, lse


def output_projection(attn: torch.Tensor, w: dict) -> torch.Tensor:
    """MLA.12 — concatenate the heads head-major, then ``o_proj``: ``[batch, seq, hidden_size]``."""
    return linear(attn.flatten(2), w["o_proj.weight"])


def mla_prefill(config, weights, hidden, start_positions):
    """MLA.1-MLA.12 without a cache, naive form: per-head k_nope and values from the latent (V2R eq. 9-19)."""
    cfg, w, x = config, checkpoint(weights), _t(hidden)
    batch, seq, _ = x.shape
    positions = _ints(start_positions)[:, None] + torch.arange(seq, device=DEVICE)  # [batch, seq]
    steps = {}
    output, lse = mla_naive(cfg, w, x, positions, steps)
    return _np({"output": output, "lse": lse, **steps})


def mla_naive(cfg: dict, w: dict, x: torch.Tensor, positions: torch.Tensor, steps: dict):
    """MLA.1-MLA.12 on ``x [batch, seq, hidden_size]`` at ``positions``, causal among the given tokens: output and LSE."""
    heads, nope, v_dim = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    batch, seq, _ = x.shape
    c_q, q_nope, q_pe, kv_latent, k_pe, _ = project(cfg, w, x, positions, steps)
    kv = linear(kv_latent, w["kv_b_proj.weight"]).unflatten(-1, (heads, nope + v_dim))  # [batch, seq, heads, nope + v]
    k_nope, value = kv.split([nope, v_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)  # [batch, seq, heads, qk_head_dim]
    k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, heads, -1)], dim=-1)
    visible = causal_visible(torch.zeros(batch, dtype=torch.int64, device=DEVICE), torch.full((batch,), seq, device=DEVICE), seq, seq)
    attended = visible
    if cfg.get("index_topk") is not None:  # DSA: each query attends to the keys its indexer selected (EXP's masked MHA prefill)
        q_index, k_index, head_weights = indexer(cfg, w, x, c_q, positions, steps)
        indices = select_keys(cfg, q_index, k_index, head_weights, visible, steps)
        attended = visible & index_mask(indices, seq)
    logits = attention_scale(cfg) * torch.einsum("bshd,bthd->bhst", q.to(_stat()), k.to(_stat()))  # [batch, heads, seq, keys]
    probs, lse = masked_softmax(logits, attended[:, None])
    attn = torch.einsum("bhst,bthd->bshd", probs.to(value.dtype), value)  # [batch, seq, heads, v_head_dim]
    output = output_projection(attn, w)
    steps.update({"MLA.6/k_nope": k_nope, "MLA.6/value": value, "MLA.7/q_full": q, "MLA.7/k_full": k, "MLA.8/visible": visible,
                  "MLA.9/logits": logits, "MLA.10/probs": probs, "MLA.10/lse": lse, "MLA.11/attn": attn, "MLA.12/output": output})
    return output, lse


def mla_extend(config, weights, hidden, cache_rows, cache_lengths, query_lengths):
    """MLA layer after cached latent rows, absorbed form (V2R section 2.1.2): chunked prefill, decode or verification."""
    if config.get("index_topk") is not None:
        raise Unsupported("a DSA layer (index_topk set) needs the indexer's key cache too: dsa_extend")
    return _np(extend(config, weights, hidden, cache_rows, None, cache_lengths, query_lengths))


def append_rows(cached_rows, new_rows: torch.Tensor, cached: torch.Tensor, real: torch.Tensor, keys: int) -> torch.Tensor:
    """MLA.18 / DSA.7 — each sequence's real new rows written after its cached prefix: ``[batch, keys, width]``."""
    rows = _t(cached_rows)[:, :keys]
    rows = F.pad(rows, (0, 0, 0, keys - rows.shape[1]))
    b, i = torch.nonzero(real, as_tuple=True)
    rows[b, cached[b] + i] = new_rows[b, i]
    return rows


def extend(cfg: dict, weights: dict, hidden, cache_rows, index_key_rows, cache_lengths, query_lengths) -> dict:
    """A layer after cached latent rows, absorbed form; with ``index_key_rows`` (DSA) the indexer picks the rows each query reads."""
    w, x = checkpoint(weights), _t(hidden)
    heads, nope, v_dim, rank = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    seq = x.shape[1]
    cached, new = _ints(cache_lengths), _ints(query_lengths)
    positions = cached[:, None] + torch.arange(seq, device=DEVICE)  # [batch, seq] absolute positions
    steps = {}
    c_q, q_nope, q_pe, _, _, rows = project(cfg, w, x, positions, steps)
    real = torch.arange(seq, device=DEVICE)[None] < new[:, None]  # [batch, seq]: right padding is not cached
    rows = rows.masked_fill(~real[..., None], 0.0)
    keys = int((cached + new).max())
    key_rows = append_rows(cache_rows, rows, cached, real, keys)  # [batch, keys, kv_lora_rank + rope]
    if DTYPE == "fp8" and index_key_rows is not None and rank % BLOCK == 0:  # FP8.12: V3.2 holds its latent cache as FP8 records
        key_rows = decode_records(encode_records(key_rows, latent_tile_scales(key_rows[..., :rank])), rank)  # [batch, keys, width]
    visible = steps["MLA.8/visible"] = causal_visible(cached, new, seq, keys)
    w_uk, w_uv = dense(w["kv_b_proj.weight"]).unflatten(0, (heads, nope + v_dim)).split([nope, v_dim], dim=1)  # [heads, nope | v, rank]
    q_absorbed = steps["MLA.13/q_absorbed"] = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [batch, seq, heads, kv_lora_rank]
    q_latent = steps["MLA.13/q_latent"] = torch.cat([q_absorbed, q_pe], dim=-1)
    sparse = {}
    if index_key_rows is None:
        out_latent, lse = latent_attention(q_latent, key_rows, visible, attention_scale(cfg), rank, steps)
    else:  # DSA: the indexer reads its own cached keys plus the new ones, and attention reads only the selected rows
        q_index, k_index, head_weights = indexer(cfg, w, x, c_q, positions, steps)
        k_index = k_index.masked_fill(~real[..., None], 0.0)
        indices = select_keys(cfg, q_index, append_rows(index_key_rows, k_index, cached, real, keys), head_weights, visible, steps)
        out_latent, lse = sparse_latent_attention(q_latent, key_rows, indices, attention_scale(cfg), rank, steps)
        sparse = {"index_keys": k_index, "indices": indices}
    attn = steps["MLA.16/attn"] = torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # [batch, seq, heads, v_head_dim]
    output = output_projection(attn, w)
    return {"output": output, "rows": rows, "lse": lse, **sparse, "MLA.12/output": output, **steps}


def decode_records(records: torch.Tensor, rank: int) -> torch.Tensor:
    """FP8.11 — FlashMLA's FP8 cache records ``[..., rank + 4 * rank / 128 + 2 * rope]`` (656 bytes for V3.2: e4m3 codes,
    float32 scales one per 128, bf16 rope, little-endian) to rows ``[latent | rope]``; in bf16 mode the product is taken
    in bf16 as FlashMLA's kernel does (bf16(code) * bf16(scale))."""
    tiles = rank // 128
    codes = records[..., :rank].contiguous().view(torch.float8_e4m3fn)  # [..., rank]
    scales = records[..., rank:rank + 4 * tiles].contiguous().view(torch.float32)  # [..., tiles]
    rope = records[..., rank + 4 * tiles:].contiguous().view(torch.bfloat16)  # [..., rope]
    product = torch.bfloat16 if DTYPE == "bfloat16" else _stat()
    latent = codes.to(product).unflatten(-1, (tiles, 128)) * scales.to(product)[..., None]  # [..., tiles, 128]
    return torch.cat([latent.flatten(-2).to(_dtype()), rope.to(_dtype())], dim=-1)


def encode_records(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8.10 — rows ``[..., rank + rope]`` to records ``[..., rank + 4 * rank / 128 + 2 * rope]`` uint8 (e4m3 codes of
    latent / scale, the float32 scales ``[..., rank / 128]``, bf16 rope), in float32 whatever the dtype: records are bytes."""
    rank = BLOCK * scale.shape[-1]
    tiles = rows[..., :rank].to(torch.float32).unflatten(-1, (-1, BLOCK))  # [..., tiles, 128]
    codes = e4m3(tiles / scale[..., None]).flatten(-2).view(torch.uint8)  # [..., rank]
    rope = rows[..., rank:].to(torch.float32).to(torch.bfloat16).contiguous().view(torch.uint8)  # [..., 2 * rope]
    return torch.cat([codes, scale.contiguous().view(torch.uint8), rope], dim=-1)  # [..., record]


def latent_tile_scales(latent: torch.Tensor) -> torch.Tensor:
    """FP8.9 ue8m0 — V3.2's cache scales (EXP act_quant with scale_fmt ue8m0): ``max(amax, 1e-4) / 448`` per 128-wide tile,
    rounded up to a power of two; ``latent [..., rank]`` -> ``[..., rank / 128]`` float32."""
    amax = latent.to(torch.float32).unflatten(-1, (-1, BLOCK)).abs().amax(dim=-1).clamp(min=1e-4)  # [..., tiles]
    return ue8m0(amax * (1.0 / FP8_MAX))


def fp8_cache_write(rows, scales):
    """FP8.10 — vLLM's / SGLang's FP8 cache store with explicit scales: rows ``[tokens, rank + rope]`` to records."""
    scale = torch.as_tensor(np.asarray(scales), device=DEVICE).to(torch.float32)  # [tokens, tiles]
    return {"records": encode_records(torch.as_tensor(np.asarray(rows), device=DEVICE), scale).cpu().numpy()}


def index_cache_write(keys, k_cache, slot_mapping, scale_rule):
    """DSA.15-DSA.16 — vLLM's indexer_k_quant_and_cache: per token the float32 scale max(amax, 1e-4) / 448 (ue8m0: rounded
    up to a power of two) and e4m3 codes of key / scale, into DeepGEMM's pages: a page's block_size x D codes, then its
    block_size float32 scales. Float32 whatever the dtype: the pages are bytes."""
    pages = torch.as_tensor(np.array(k_cache), device=DEVICE)  # a copy: [num_blocks, block_size, 1, D + 4]
    num_blocks, block_size, _, width = pages.shape
    dim, slots = width - 4, _ints(slot_mapping)
    k = torch.as_tensor(np.asarray(keys), device=DEVICE).to(torch.float32)[slots >= 0]  # [written, D]
    scale = k.abs().amax(dim=-1).clamp(min=1e-4) / FP8_MAX  # [written]
    scale = ue8m0(scale) if scale_rule == "ue8m0" else scale
    codes = e4m3(k / scale[:, None]).view(torch.uint8)  # [written, D]
    page, offset = slots[slots >= 0] // block_size, slots[slots >= 0] % block_size
    flat = pages.view(num_blocks, block_size * width)  # one page per row
    code_at, scale_at = offset[:, None] * dim, block_size * dim + offset[:, None] * 4  # [written, 1]: all codes, then all scales
    flat[page[:, None], code_at + torch.arange(dim, device=DEVICE)] = codes
    flat[page[:, None], scale_at + torch.arange(4, device=DEVICE)] = scale[:, None].view(torch.uint8)
    return {"k_cache": pages.cpu().numpy(), "DSA.16/k_cache": pages.cpu().numpy()}


def index_key_pages(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DSA.17 — DeepGEMM's paged indexer keys ``[num_blocks, block_size, 1, D + 4]`` uint8: codes ``[num_blocks, block_size, D]``
    (the page's first block_size x D bytes) as floats and scales ``[num_blocks, block_size]`` (the float32s after them)."""
    num_blocks, block_size, _, width = pages.shape
    flat = pages.reshape(num_blocks, block_size * width)
    codes = flat[:, : block_size * (width - 4)].contiguous().view(torch.float8_e4m3fn).unflatten(-1, (block_size, width - 4))
    scales = flat[:, block_size * (width - 4):].contiguous().view(torch.float32)  # [num_blocks, block_size]
    return codes.to(_stat()), scales.to(_stat())


def index_logits_paged(q, k_cache, logit_weights, context_lens, block_table):
    """DSA.18 — DeepGEMM fp8_paged_mqa_logits: relu(q . codes) x the key's scale per head, weighted by the caller's folded
    weights and summed over heads; query i sees the keys up to context_len - next_n + i, -inf elsewhere."""
    q_codes = torch.as_tensor(np.asarray(q), device=DEVICE).view(torch.float8_e4m3fn).to(_stat())  # [batch, next_n, heads, D]
    key_codes, key_scales = index_key_pages(torch.as_tensor(np.asarray(k_cache), device=DEVICE))
    table, lengths, weights = _ints(block_table), _ints(context_lens), _t(logit_weights, _stat())
    next_n, block_size = q_codes.shape[1], key_codes.shape[1]
    positions = torch.arange(table.shape[1] * block_size, device=DEVICE)  # [keys]
    page, offset = table[:, positions // block_size].clamp(min=0), positions % block_size  # [batch, keys]; -1 pages masked below
    dots = torch.einsum("bnhd,bkd->bnhk", q_codes, key_codes[page, offset]) * key_scales[page, offset][:, None, None, :]
    logits = (dots.relu() * weights[..., None]).sum(2)  # [batch, next_n, keys]
    last = lengths[:, None] - next_n + torch.arange(next_n, device=DEVICE)  # [batch, next_n]: each query's position
    logits = logits.masked_fill(positions > last[..., None], float("-inf"))  # replaces the NaN of unused slots too
    return _np({"logits": logits, "DSA.18/logits": logits})


def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """MLA.17 — FlashMLA ``flash_mla_with_kvcache``: paged gather (MLA.19), then latent attention with the given scale.

    A uint8 ``k_cache`` is FlashMLA's FP8 cache (``is_fp8_kvcache``): records gathered, then decoded (FP8.11)."""
    q, table, seqlens = _t(q), _ints(block_table), _ints(cache_seqlens)
    cache = torch.as_tensor(np.asarray(k_cache), device=DEVICE)
    records = cache.dtype == torch.uint8
    cache = cache if records else cache.to(_dtype())
    batch, s_q = q.shape[:2]
    block_size = cache.shape[1]
    t = torch.arange(int(seqlens.max()), device=DEVICE)  # [keys]
    held = t[None] < seqlens[:, None]  # [batch, keys]
    blocks = table[:, t // block_size].clamp(min=0)  # [batch, keys]
    key_rows = cache[blocks, t % block_size, 0].masked_fill(~held[..., None], 0)  # [batch, keys, width or record]; NaN slots dropped
    steps = {"MLA.19/key_rows": key_rows}
    if records:
        key_rows = steps["FP8.11/rows"] = decode_records(key_rows, int(head_dim_v))  # [batch, keys, width]
    if causal:
        visible = causal_visible(seqlens - s_q, torch.full((batch,), s_q, device=DEVICE), s_q, t.numel())
    else:
        visible = held[:, None].expand(-1, s_q, -1)
    steps["MLA.8/visible"] = visible
    scale = float(softmax_scale)
    out, lse = latent_attention(q, key_rows, visible, scale, int(head_dim_v), steps)
    return _np({"out": out, "lse": lse, "MLA.17/out": out, "MLA.17/lse": lse, **steps})


def sparse_attention(q: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, scale: float, head_dim_v: int):
    """FlashMLA's sparse kernels: ``q [n, heads, width]`` against each query's own ``rows [n, topk, width]`` where ``valid``;
    ``out [n, heads, head_dim_v]`` and the natural-log ``lse [n, heads]``, +inf (out 0) for a query with nothing valid."""
    logits = scale * torch.einsum("nhc,nkc->nhk", q.to(_stat()), rows.to(_stat()))  # [n, heads, topk]
    probs, lse = masked_softmax(logits, valid[:, None])
    out = torch.einsum("nhk,nkc->nhc", probs.to(rows.dtype), rows[..., :head_dim_v])
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def sparse_decode_core(q, k_cache, indices, head_dim_v, softmax_scale):
    """DSA.13 — FlashMLA sparse decode: index = page * block_size + offset into the paged cache, -1 invalid.

    A uint8 ``k_cache`` is FlashMLA's FP8 cache: every record decoded (FP8.11; NaN records are never attended)."""
    q, cache, index = _t(q), torch.as_tensor(np.asarray(k_cache), device=DEVICE), _ints(indices)
    batch, s_q = q.shape[:2]
    flat = cache.flatten(0, 2)  # [num_blocks * block_size, width]: row page * block_size + offset
    flat = decode_records(flat, int(head_dim_v)) if flat.dtype == torch.uint8 else flat.to(_dtype())
    valid = index != -1  # [batch, s_q, topk]
    rows = flat[index.clamp(min=0)].masked_fill(~valid[..., None], 0.0)  # [batch, s_q, topk, width]; invalid slots dropped
    out, lse = sparse_attention(q.flatten(0, 1), rows.flatten(0, 1), valid.flatten(0, 1), float(softmax_scale), int(head_dim_v))
    out, lse = out.unflatten(0, (batch, s_q)), lse.unflatten(0, (batch, s_q)).transpose(1, 2)  # lse [batch, heads, s_q]
    return _np({"out": out, "lse": lse, "DSA.13/out": out, "DSA.13/lse": lse})


def sparse_prefill_core(q, kv, indices, softmax_scale, head_dim_v):
    """DSA.14 — FlashMLA sparse prefill over one KV: any index < 0 or >= s_kv is invalid."""
    q, rows_in, index = _t(q), _t(kv)[:, 0], _ints(indices)[:, 0]  # [s_kv, width], [s_q, topk]
    valid = (index >= 0) & (index < rows_in.shape[0])
    rows = rows_in[torch.where(valid, index, 0)].masked_fill(~valid[..., None], 0.0)  # [s_q, topk, width]
    scale = float(softmax_scale)  # the model's scale, passed by the caller
    out, lse = sparse_attention(q, rows, valid, scale, int(head_dim_v))
    return _np({"out": out, "lse": lse, "DSA.14/out": out, "DSA.14/lse": lse})


# ---------------------------------------------------------------------------- DSA (DeepSeek-V3.2 sparse attention)

@functools.lru_cache(maxsize=None)
def hadamard(width: int) -> torch.Tensor:
    """DSA.5 — the normalised Sylvester Hadamard matrix, doubled up from [1]: ``H_2n = [[H, H], [H, -H]] / sqrt(2)`` (float64)."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < width:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0) / math.sqrt(2)
    return matrix


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """DSA.2's key norm — LayerNorm with weight and bias (biased variance), computed in fp32 as EXP's k_norm, one rounding back."""
    return F.layer_norm(x.to(_stat()), x.shape[-1:], weight.to(_stat()), bias.to(_stat()), eps).to(x.dtype)


def indexer_rope(x: torch.Tensor, cis: torch.Tensor, rope: int) -> torch.Tensor:
    """DSA.4 — the indexer rotates its FIRST ``rope`` dims in NeoX pairs ``(i, i + rope/2)`` whatever MLA's layout (EXP 8631a81)."""
    x_pe, x_nope = x.split([rope, x.shape[-1] - rope], dim=-1)  # [rope | nope], the opposite of MLA's order
    return torch.cat([rotate(x_pe, cis, "half"), x_nope], dim=-1)


def indexer(cfg: dict, w: dict, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor, steps: dict):
    """DSA.1-DSA.6 — index queries per head from c_q, one key per token from x (both after RoPE and the Hadamard), head weights."""
    heads, dim, rope = cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    q = steps["DSA.1/q_index"] = linear(c_q, w["indexer.wq_b.weight"]).unflatten(-1, (heads, dim))  # [batch, seq, index_heads, index_dim]
    k = steps["DSA.2/k_index"] = layer_norm(linear(x, w["indexer.wk.weight"]), w["indexer.k_norm.weight"], w["indexer.k_norm.bias"],
                                            cfg["index_norm_eps"])  # [batch, seq, index_dim]: one key head
    head_weights = steps["DSA.3/head_weights"] = F.linear(x.to(_stat()), w["indexer.weights_proj.weight"].to(_stat())) * heads ** -0.5
    cis = rope_cis(cfg, positions)  # [batch, seq, rope_half]: MLA's YaRN table
    q = steps["DSA.4/q_index_rotated"] = indexer_rope(q, cis[:, :, None], rope)
    k = steps["DSA.4/k_index_rotated"] = indexer_rope(k, cis, rope)
    rotation = hadamard(dim).to(_stat()).to(DEVICE)  # [index_dim, index_dim], symmetric
    q = steps["DSA.5/rotated"] = (q.to(_stat()) @ rotation).to(q.dtype)
    k = (k.to(_stat()) @ rotation).to(k.dtype)
    steps.update({"DSA.6/q_hat": q, "DSA.6/k_hat": k})  # no FP8 round trip here (DSA.6 quantize=False)
    return q, k, head_weights  # [batch, seq, index_heads, index_dim], [batch, seq, index_dim], [batch, seq, index_heads]


def select_keys(cfg: dict, q: torch.Tensor, k: torch.Tensor, head_weights: torch.Tensor, visible: torch.Tensor, steps: dict) -> torch.Tensor:
    """DSA.8-DSA.10 — index scores, -inf where a key is not visible, the best ``min(index_topk, visible)`` positions; -1 pads."""
    dots = torch.einsum("bshd,btd->bsht", q.to(_stat()), k.to(_stat())) * q.shape[-1] ** -0.5  # [batch, seq, index_heads, keys]
    scores = steps["DSA.8/scores"] = (dots.relu() * head_weights[..., None]).sum(2)  # [batch, seq, keys]: ReLU, then the signed weights
    masked = steps["DSA.9/masked_scores"] = scores.masked_fill(~visible, float("-inf"))
    ranked = torch.sort(masked, dim=-1, descending=True, stable=True)  # equal scores: the lower position first
    kept = min(cfg["index_topk"], masked.shape[-1])
    indices = steps["DSA.10/indices"] = torch.where(ranked.values[..., :kept] > float("-inf"), ranked.indices[..., :kept], -1)
    return indices  # [batch, seq, min(index_topk, keys)]


def index_mask(indices: torch.Tensor, keys: int) -> torch.Tensor:
    """``[batch, seq, keys]``: True at the selected positions (EXP's index_mask scatter); a -1 slot selects nothing."""
    mask = torch.zeros(indices.shape[:2] + (keys + 1,), dtype=torch.bool, device=DEVICE)  # the extra column takes the -1 slots
    return mask.scatter_(-1, torch.where(indices >= 0, indices, keys), True)[..., :keys]


def sparse_latent_attention(q_latent: torch.Tensor, key_rows: torch.Tensor, indices: torch.Tensor, scale: float, head_dim_v: int,
                            steps: dict):
    """DSA.11-DSA.12 — absorbed MQA over each query's selected latent rows only (FlashMLA's sparse form); -1 is an empty slot."""
    valid = indices >= 0  # [batch, seq, selected]
    batch = torch.arange(key_rows.shape[0], device=DEVICE)[:, None, None]
    rows = key_rows[batch, indices.clamp(min=0)].masked_fill(~valid[..., None], 0.0)  # [batch, seq, selected, width]
    logits = scale * torch.einsum("bshc,bsjc->bhsj", q_latent.to(_stat()), rows.to(_stat()))  # [batch, heads, seq, selected]
    probs, lse = masked_softmax(logits, valid[:, None])
    out_latent = torch.einsum("bhsj,bsjc->bshc", probs.to(rows.dtype), rows[..., :head_dim_v])  # [batch, seq, heads, v]
    steps.update({"DSA.12/out_latent": out_latent, "DSA.12/lse": lse})
    return out_latent, lse


def dsa_indexer(config, weights, hidden, start_positions):
    """DSA.1-DSA.10 — the lightning indexer without a cache, causal among the given tokens: selected positions and masked scores."""
    cfg, w, x = config, checkpoint(weights), _t(hidden)
    batch, seq, _ = x.shape
    positions = _ints(start_positions)[:, None] + torch.arange(seq, device=DEVICE)  # [batch, seq]: RoPE positions only
    steps = {}
    q_index, k_index, head_weights = indexer(cfg, w, x, query_input(cfg, w, x, cfg["rms_norm_eps"], steps), positions, steps)
    visible = causal_visible(torch.zeros(batch, dtype=torch.int64, device=DEVICE), torch.full((batch,), seq, device=DEVICE), seq, seq)
    indices = select_keys(cfg, q_index, k_index, head_weights, visible, steps)
    return _np({"indices": indices, "scores": steps["DSA.9/masked_scores"], **steps})


def dsa_prefill(config, weights, hidden, start_positions):
    """A DSA layer without a cache: MLA.1-MLA.12 in the naive form, each query attending to the keys its indexer selected."""
    outputs = mla_prefill(config, weights, hidden, start_positions)
    return {**outputs, "indices": outputs["DSA.10/indices"]}


def dsa_extend(config, weights, hidden, cache_rows, index_key_rows, cache_lengths, query_lengths):
    """A DSA layer after cached latent rows and indexer keys (bottom-right causal): chunked prefill or decode, sparse absorbed MLA."""
    return _np(extend(config, weights, hidden, cache_rows, index_key_rows, cache_lengths, query_lengths))


# ---------------------------------------------------------------------------- MoE

def moe_route(config, weights, hidden):
    """MOE.1-MOE.8 — group-limited top-k with a selection-only bias; ties go to the lower index."""
    return _np(_route(config, weights, _t(hidden).flatten(0, -2)))


def _route(cfg: dict, weights: dict, x: torch.Tensor) -> dict:
    """MOE.1-MOE.8 on ``x [tokens, hidden_size]``: expert ids, weights and every intermediate."""
    logits = F.linear(x.to(_stat()), _t(weights["mlp.gate.weight"]).to(_stat()))  # [tokens, experts], fp32 router
    scores = logits.sigmoid() if cfg["scoring_func"] == "sigmoid" else logits.softmax(dim=-1)
    bias = weights.get("mlp.gate.e_score_correction_bias")
    selection = scores + _t(bias, _stat()) if bias is not None else scores  # MOE.3: the bias only selects
    groups = selection.unflatten(-1, (cfg["n_group"], -1))  # [tokens, n_group, experts_per_group]
    group_rule = cfg["group_score_rule"] or ("top2_sum" if cfg["topk_method"] == "noaux_tc" else "max")
    if group_rule == "top2_sum":
        group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # [tokens, n_group]
    else:
        group_scores = groups.amax(dim=-1)
    group_order = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices
    kept = group_order[:, : cfg["topk_group"]]  # [tokens, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    fill = 0.0 if cfg["group_mask_fill"] == "zero" else float("-inf")
    masked = groups.masked_fill(~keep[..., None], fill).flatten(1)  # [tokens, experts]
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # ties: lower expert index first
    expert_ids = order[:, : cfg["num_experts_per_tok"]]  # [tokens, K]
    routing = scores.gather(1, expert_ids)  # unbiased scores of the chosen experts
    renormalise = cfg["norm_topk_prob"] if cfg["topk_norm_rule"] == "norm_topk_prob" else cfg["scoring_func"] == "sigmoid"
    if renormalise:
        routing = routing / (routing.sum(-1, keepdim=True) + cfg["topk_norm_epsilon"])
    routing = routing * cfg["routed_scaling_factor"]
    return {"expert_ids": expert_ids, "weights": routing, "MOE.1/logits": logits, "MOE.2/scores": scores, "MOE.3/selection": selection,
            "MOE.4/group_scores": group_scores, "MOE.6/masked": masked, "MOE.7/expert_ids": expert_ids,
            "MOE.8/weights": routing}


def swiglu(x: torch.Tensor, weights: dict, prefix: str) -> torch.Tensor:
    """MOE.9 / MOE.11 / MOE.13 — ``down(silu(gate(x)) * up(x))``."""
    gate, up, down = (tensor(weights, f"{prefix}{name}_proj.weight") for name in ("gate", "up", "down"))
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def moe_layer(config, weights, hidden, layer):
    """MOE.1-MOE.13 — routed experts weighted and summed in fp32 (expert order), plus the shared experts unweighted."""
    x = _t(hidden)
    steps = {}
    output = ffn(config, weights, x.flatten(0, -2), layer, steps)  # [tokens, hidden_size]
    return _np({"output": output.reshape(x.shape), **steps})


def ffn(cfg: dict, weights: dict, x: torch.Tensor, layer: int, steps: dict) -> torch.Tensor:
    """MOE.1-MOE.13 on ``x [tokens, hidden_size]``: the dense MLP or the MoE layer of ``layer``; adds expert_ids for MoE."""
    is_moe = layer >= cfg["first_k_dense_replace"] and layer % cfg["moe_layer_freq"] == 0
    if not is_moe:
        output = steps["MOE.13/output"] = swiglu(x, weights, "mlp.")  # MOE.13
        return output
    steps.update(_route(cfg, weights, x))
    expert_ids, routing = steps["expert_ids"], steps.pop("weights")
    routed = torch.zeros(x.shape, dtype=_stat(), device=DEVICE)
    for expert in expert_ids.unique().tolist():  # MOE.9-MOE.10, in increasing expert id
        token, slot = torch.nonzero(expert_ids == expert, as_tuple=True)  # the (token, slot) pairs routed to it
        out = swiglu(x[token], weights, f"mlp.experts.{expert}.")
        routed.index_add_(0, token, out.to(_stat()) * routing[token, slot, None])
    routed = steps["MOE.10/routed"] = routed.to(x.dtype)
    shared = swiglu(x, weights, "mlp.shared_experts.") if cfg["n_shared_experts"] else torch.zeros_like(x)  # MOE.11
    output = routed + shared  # MOE.12
    steps.update({"MOE.11/shared": shared} if cfg["n_shared_experts"] else {})
    steps["MOE.12/output"] = output
    return output


# ---------------------------------------------------------------------------- training rules and dispatch

def moe_balance(config, scores, expert_ids, bias):
    """MOE.14-MOE.17 — expert load, the bias update (V3R 2.1.2), the V3 sequence-wise loss (eqs. 17-20), the V2 losses (V2R 2.2.3)."""
    cfg, s, ids = config, _t(scores, _stat()), _ints(expert_ids)  # [batch, seq, experts], [batch, seq, K]
    experts, k, seq = cfg["n_routed_experts"], cfg["num_experts_per_tok"], s.shape[1]
    devices, device_limit, alpha = cfg["n_group"], cfg["topk_group"], cfg["aux_loss_alpha"]
    load = torch.bincount(ids.flatten(), minlength=experts)  # MOE.14: assignments per expert
    new_bias = _t(bias, _stat()) + cfg["bias_update_speed"] * torch.sign(load.sum() - experts * load).to(_stat())  # MOE.15: overloaded go down

    def frequency(chosen: torch.Tensor) -> torch.Tensor:  # f_i = N_r / (K_r T) * times expert i is chosen: [batch, experts]
        return experts / (k * seq) * F.one_hot(chosen, experts).sum((1, 2)).to(_stat())

    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]  # eq. 18: top-K of the unbiased scores
    f_seq, p_seq = frequency(top), (s / s.sum(-1, keepdim=True)).mean(1)  # P_i from s' normalised over all experts
    sequence_loss = alpha * (f_seq * p_seq).sum(-1)  # MOE.16: [batch]
    f, p = frequency(ids), s.mean(1)  # MOE.17 on the routing decisions and the raw affinities
    f_device, p_device = f.unflatten(-1, (devices, -1)).mean(-1), p.unflatten(-1, (devices, -1)).sum(-1)  # [batch, devices]
    reached = F.one_hot(ids // (experts // devices), devices).amax(2)  # [batch, seq, devices]: token sent to device
    f_comm = devices / (device_limit * seq) * reached.sum(1).to(_stat())
    losses = {"expert_loss": alpha * (f * p).sum(-1), "device_loss": 0.05 * (f_device * p_device).sum(-1),
              "comm_loss": 0.02 * (f_comm * p_device).sum(-1)}
    return _np({"load": load, "new_bias": new_bias, "sequence_loss": sequence_loss, **losses, "MOE.14/load": load,
                "MOE.15/new_bias": new_bias, "MOE.16/loss": sequence_loss, "MOE.16/f": f_seq, "MOE.16/p": p_seq,
                **{f"MOE.17/{name}": value for name, value in losses.items()}})


def dispatch_plan(config, expert_ids, ranks):
    """MOE.18 — (token, slot, expert) sorted by expert, then token, then slot; assignments per rank; groups per token."""
    ids = _ints(expert_ids)  # [tokens, K]
    k, experts, groups = ids.shape[1], config["n_routed_experts"], config["n_group"]
    flat = ids.flatten()  # index token * K + slot: already in token, then slot order
    order = torch.sort(flat, stable=True).indices  # by expert, keeping token / slot order among equals
    entries = torch.stack([order // k, order % k, flat[order]], dim=-1)  # [tokens * K, 3]
    counts = torch.bincount(flat // (experts // int(ranks)), minlength=int(ranks))  # [ranks]
    groups_per_token = F.one_hot(ids // (experts // groups), groups).amax(1).sum(-1)  # distinct groups reached: [tokens]
    return _np({"entries": entries, "counts": counts, "groups_per_token": groups_per_token,
                "MOE.18/entries": entries, "MOE.18/counts": counts, "MOE.18/groups_per_token": groups_per_token})


# ---------------------------------------------------------------------------- decoder stack (MODEL) and MTP

def _layer_weights(weights: dict, layer: int) -> dict:
    """The tensors of ``model.layers.{layer}.`` under their relative names (NumPy, as the MoE code reads them)."""
    prefix = f"model.layers.{layer}."
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def embed(weights: dict, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """MODEL.1 — ``Emb[tokens]``, no scaling; padding rows (i >= lengths[b]) are 0."""
    real = torch.arange(tokens.shape[1], device=DEVICE)[None] < lengths[:, None]  # [batch, seq]
    return _t(weights["model.embed_tokens.weight"])[torch.where(real, tokens, 0)] * real[..., None]


def decoder_block(cfg: dict, weights: dict, layer: int, x: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, steps: dict):
    """MODEL.2 -> MODEL.3 — pre-norm ``x + MLA(norm x)``, then ``x + FFN(norm x)`` (dense or MoE by layer); padded rows stay 0."""
    w = _layer_weights(weights, layer)
    attn_w = {name[len("self_attn."):]: _t(value) for name, value in w.items() if name.startswith("self_attn.")}
    eps, mask = cfg["rms_norm_eps"], real[..., None]
    attn, _ = mla_naive(cfg, attn_w, rms_norm(x, _t(w["input_layernorm.weight"]), eps), positions, {})
    x = steps["MODEL.2/hidden"] = (x + attn) * mask  # MODEL.2
    normed = rms_norm(x, _t(w["post_attention_layernorm.weight"]), eps)
    x = steps["MODEL.3/hidden"] = (x + ffn(cfg, w, normed.flatten(0, 1), layer, {}).reshape(x.shape)) * mask  # MODEL.3
    return x


def forward(cfg: dict, weights: dict, tokens: torch.Tensor, lengths: torch.Tensor, steps: dict):
    """MODEL.1-MODEL.5 without a cache on right-padded ``tokens [batch, seq]``: logits, pre- and post-norm hidden states."""
    seq = tokens.shape[1]
    real = torch.arange(seq, device=DEVICE)[None] < lengths[:, None]  # [batch, seq]
    positions = torch.arange(seq, device=DEVICE).expand(tokens.shape[0], -1)
    x = steps["MODEL.1/hidden"] = embed(weights, tokens, lengths)
    for layer in range(cfg["num_hidden_layers"]):
        x = decoder_block(cfg, weights, layer, x, positions, real, steps)
    post = steps["MODEL.4/post_norm_hidden"] = rms_norm(x, _t(weights["model.norm.weight"]), cfg["rms_norm_eps"])  # MODEL.4
    logits = steps["MODEL.5/logits"] = F.linear(post, _t(weights["lm_head.weight"]))  # MODEL.5: untied head
    return logits, x, post


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, normaliser: int) -> torch.Tensor:
    """MODEL.7 — ``-(1 / (batch * normaliser)) sum log softmax(logits)[targets]``, in the statistics dtype."""
    log_probs = torch.log_softmax(logits.to(_stat()), dim=-1)  # [batch, rows, vocab]
    return -log_probs.gather(-1, targets[..., None]).sum() / (logits.shape[0] * normaliser)


def model_logits(config, weights, tokens, query_lengths):
    """MODEL.1-MODEL.5 — logits of every position of a right-padded batch (padded rows 0)."""
    steps = {}
    logits, _, _ = forward(config, weights, _ints(tokens), _ints(query_lengths), steps)
    return _np({"logits": logits, **steps})


def _last(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b]]`` for every b, keeping a length-1 sequence axis."""
    return tensor[torch.arange(tensor.shape[0], device=DEVICE), index][:, None]


def greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps):
    """MODEL.6 — greedy tokens (argmax, ties to the lowest id); uncached: the whole sequence is recomputed each step."""
    lengths, prompts = _ints(prompt_lengths), _ints(prompt_tokens)
    batch, steps = prompts.shape[0], int(steps)
    sequence = F.pad(prompts, (0, steps))  # [batch, longest prompt + steps], right-padded
    rows = torch.arange(batch, device=DEVICE)
    tokens, chosen, trace = [], [], {}
    for step in range(steps):
        trace = {}
        logits, _, _ = forward(config, weights, sequence, lengths + step, trace)
        last = lengths + step - 1  # the last known position of each sequence
        step_logits = logits[rows, last]  # [batch, vocab]
        token = step_logits.to(_stat()).argmax(-1)  # MODEL.6: the first maximum
        sequence[rows, lengths + step] = token
        tokens.append(token)
        chosen.append(step_logits)
    trace = {name: _last(value, last) for name, value in trace.items()}  # the last step's new position, as a decode step sees it
    return _np({"tokens": torch.stack(tokens, 1), "logits": torch.stack(chosen, 1), "MODEL.6/next_token": tokens[-1], **trace})


def mtp_layer(cfg: dict, depth: int) -> int:
    """MTP.3 — depth k runs module k, or with reuse module ((k - 1) mod M) + 1; its layer id follows the main layers."""
    module = depth if cfg["mtp_module_reuse"] == "none" else (depth - 1) % cfg["num_nextn_predict_layers"] + 1
    return cfg["num_hidden_layers"] + module - 1


def mtp_depths(cfg: dict) -> int:
    """D: mtp_depths, else one depth per module."""
    return cfg["mtp_depths"] or cfg["num_nextn_predict_layers"]


def mtp_module(cfg: dict, weights: dict, depth: int, previous: torch.Tensor, next_tokens: torch.Tensor, rows: torch.Tensor,
               steps: dict):
    """MTP.2-MTP.4 — depth k's module on rows ``previous [batch, rows, hidden]`` with ``Emb(t_{i+k})``: h^k and logits."""
    layer = mtp_layer(cfg, depth)
    w, eps = _layer_weights(weights, layer), cfg["rms_norm_eps"]
    embedded = rms_norm(embed(weights, next_tokens, rows), _t(w["enorm.weight"]), eps)
    hidden = rms_norm(previous, _t(w["hnorm.weight"]), eps)
    halves = [embedded, hidden] if cfg["mtp_concat_order"] == "embedding_first" else [hidden, embedded]
    combined = steps["MTP.2/combined"] = F.linear(torch.cat(halves, dim=-1), _t(w["eh_proj.weight"]))  # MTP.2
    start = 0 if cfg["mtp_rope_position"] == "hidden" else depth  # row i at position i (hidden) or i + k (token)
    positions = start + torch.arange(combined.shape[1], device=DEVICE).expand(combined.shape[0], -1)
    real = torch.arange(combined.shape[1], device=DEVICE)[None] < rows[:, None]
    block = steps["MTP.3/block_output"] = decoder_block(cfg, weights, layer, combined, positions, real, {})  # MTP.3
    h = steps["MTP.4/hidden"] = rms_norm(block, _t(w["shared_head.norm.weight"]), eps)  # MTP.4: h^k, the next depth's input
    logits = steps["MTP.4/logits"] = F.linear(h, _t(weights["lm_head.weight"]))  # the shared head
    return h, logits


def mtp_forward(config, weights, tokens, mtp_lambda):
    """MTP.1-MTP.6 and MODEL.7 — the main model on tokens[:, :seq], the chain of D modules, per-depth logits and losses."""
    cfg, tokens = config, _ints(tokens)
    batch, seq, depths = tokens.shape[0], tokens.shape[1] - 1, mtp_depths(cfg)
    steps = {}
    main_logits, pre_norm, post_norm = forward(cfg, weights, tokens[:, :seq], torch.full((batch,), seq, device=DEVICE), steps)
    main_loss = steps["MODEL.7/loss"] = cross_entropy(main_logits, tokens[:, 1:], seq)  # MODEL.7
    h = steps["MTP.1/h0"] = post_norm if cfg["mtp_hidden_source"] == "post_norm" else pre_norm  # MTP.1
    depth_logits = torch.zeros((depths,) + main_logits.shape, dtype=main_logits.dtype, device=DEVICE)
    depth_losses = []
    for depth in range(1, depths + 1):
        rows = seq - depth  # row i: h^{k-1}_i and Emb(t_{i+k}), predicting t_{i+k+1}
        h, logits = mtp_module(cfg, weights, depth, h[:, :rows], tokens[:, depth: depth + rows], torch.full((batch,), rows, device=DEVICE), steps)
        depth_logits[depth - 1, :, :rows] = logits
        depth_losses.append(cross_entropy(logits, tokens[:, depth + 1:], seq))  # MTP.5: normalised by seq
    depth_losses = torch.stack(depth_losses)
    steps["MTP.5/loss"] = depth_losses[-1]
    mtp_loss = steps["MTP.6/loss"] = float(mtp_lambda) * depth_losses.sum() / depths  # MTP.6
    return _np({"main_logits": main_logits, "depth_logits": depth_logits, "main_loss": main_loss, "depth_losses": depth_losses,
                "mtp_loss": mtp_loss, **steps})


def draft(cfg: dict, weights: dict, history: torch.Tensor, known: torch.Tensor, depths: int, steps: dict) -> torch.Tensor:
    """MTP.7 — the D drafts after t_0 .. t_n (n + 1 = known), uncached; ``steps["logits"]`` gets the rows they came from.

    Chained depths run over rows 0 .. n - 1 of t_0 .. t_n, d_1 .. d_{k-1}; with recurrent reuse
    steps 2 .. D rerun module 1 over its rows plus one more row per step, which joins the h of
    the row before it with Emb(d_{k-1}).
    """
    batch, n, width = history.shape[0], known - 1, int((known - 1).max())
    rows, index = torch.arange(batch, device=DEVICE), torch.arange(width, device=DEVICE)
    _, pre_norm, post_norm = forward(cfg, weights, history[:, :width], n, {})  # h^0 of positions 0 .. n - 1
    h = steps["MTP.1/h0"] = post_norm if cfg["mtp_hidden_source"] == "post_norm" else pre_norm  # MTP.1: rows 0 .. n - 1
    sequence = F.pad(history, (0, depths))  # t_{n+j} = d_j is written as each depth drafts
    chained = 1 if cfg["mtp_module_reuse"] == "recurrent" else depths  # depths with rows of their own
    previous, chosen = F.pad(h, (0, 0, 0, depths)), []  # recurrent: h^0 rows, then one fed-back h per step
    for depth in range(1, chained + 1):
        h, logits = mtp_module(cfg, weights, depth, h, sequence[:, index + depth], n, steps)
        chosen.append(logits[rows, n - 1])  # row n - 1 drafts d_k
        sequence[rows, n + depth] = chosen[-1].to(_stat()).argmax(-1)  # MODEL.6
    previous[rows, n] = h[rows, n - 1]
    for step in range(1, depths - chained + 1):  # recurrent: row n - 1 + step joins previous[n - 1 + step] and Emb(d_step)
        grown = torch.arange(width + step, device=DEVICE)
        row_steps = {}
        h, logits = mtp_module(cfg, weights, 1, previous[:, : width + step], sequence[:, grown + 1], n + step, row_steps)
        steps.update({name: value[rows, n + step - 1][:, None] for name, value in row_steps.items()})  # the step's own row
        chosen.append(logits[rows, n + step - 1])
        sequence[rows, n + step + 1] = chosen[-1].to(_stat()).argmax(-1)  # MODEL.6: d_{step+1}
        previous[rows, n + step] = h[rows, n + step - 1]  # fed back after shared_head.norm (vllm #45895)
    steps["logits"] = torch.stack(chosen, dim=1)  # [batch, depths, vocab]
    return sequence[rows[:, None], n[:, None] + 1 + torch.arange(depths, device=DEVICE)]  # [batch, depths]


def mtp_draft(config, weights, prompt_tokens, prompt_lengths):
    """MTP.7 — one drafting step after the known tokens: drafts [batch, D] and the logits [batch, D, vocab] they came from."""
    steps = {}
    drafts = draft(config, weights, _ints(prompt_tokens), _ints(prompt_lengths), mtp_depths(config), steps)
    return _np({"drafts": drafts, "logits": steps.pop("logits"), "MTP.7/drafts": drafts, **steps})


def speculative_decode(config, weights, prompt_tokens, prompt_lengths, steps):
    """MTP.7-MTP.11 — greedy speculative decoding, MTP drafts verified in one main forward of D + 1 tokens, uncached.

    The main model's cache is kept as the token sequence it holds (``cached``, ``cache_lengths``); a
    verification recomputes it plus ``[t_n, d_1 .. d_D]``, and the rollback keeps a + 1 of the D + 1.
    """
    cfg, prompts, lengths = config, _ints(prompt_tokens), _ints(prompt_lengths)
    batch, steps, depths = prompts.shape[0], int(steps), mtp_depths(cfg)
    rows, width = torch.arange(batch, device=DEVICE), prompts.shape[1] + (steps + 1) * (depths + 1)  # room for any cache
    logits, _, _ = forward(cfg, weights, prompts, lengths, {})  # prefill
    history = F.pad(prompts, (0, width - prompts.shape[1]))  # [batch, width]: the known tokens t_0 .. t_n
    history[rows, lengths] = logits[rows, lengths - 1].to(_stat()).argmax(-1)  # t_n
    known, cached, cache_lengths = lengths + 1, history.clone(), lengths.clone()  # the cache holds the prompts
    emitted = torch.ones(batch, dtype=torch.int64, device=DEVICE)
    accepted_per_depth = torch.zeros(depths, dtype=torch.int64, device=DEVICE)
    proposed_per_depth = torch.zeros(depths, dtype=torch.int64, device=DEVICE)
    trace = {}
    while (active := emitted < steps).any():
        drafts = draft(cfg, weights, history, known, depths, {})  # MTP.7: [batch, depths]
        candidates = torch.cat([history[rows, known - 1][:, None], drafts], dim=1)  # [t_n, d_1 .. d_D]
        offsets = cache_lengths[:, None] + torch.arange(depths + 1, device=DEVICE)  # positions of the candidates
        sequence = cached.clone()
        sequence[rows[:, None], offsets] = candidates
        logits, _, _ = forward(cfg, weights, sequence, cache_lengths + depths + 1, {})  # MTP.8: one forward of D + 1 new tokens
        verified = logits[rows[:, None], offsets] * active[:, None, None]  # [batch, D + 1, vocab]; inactive: 0 (query length 0)
        greedy = verified.to(_stat()).argmax(-1)  # MODEL.6 per candidate
        accepted = torch.where(active, torch.cumprod(drafts == greedy[:, :-1], dim=1).sum(1), 0)  # MTP.9: longest agreeing prefix
        keep = torch.where(active, accepted + 1, 0)  # MTP.10: the cache forgets the D - a rejected candidates
        take = torch.arange(depths + 1, device=DEVICE)[None] < keep[:, None]
        b, j = torch.nonzero(take, as_tuple=True)
        cached[b, cache_lengths[b] + j] = candidates[b, j]
        history[b, known[b] + j] = greedy[b, j]  # the step emits g_0 .. g_a
        cache_lengths, known, emitted = cache_lengths + keep, known + torch.where(active, accepted + 1, 0), emitted + torch.where(active, accepted + 1, 0)
        reached = active[:, None] & (accepted[:, None] >= torch.arange(1, depths + 1, device=DEVICE)[None])  # MTP.11
        accepted_per_depth, proposed_per_depth = accepted_per_depth + reached.sum(0), proposed_per_depth + active.sum()
        trace = {"MTP.7/drafts": drafts, "MTP.8/logits": verified, "MTP.8/greedy": greedy, "MTP.9/accepted": accepted,
                 "MTP.10/lengths": cache_lengths}
    tokens = history[rows[:, None], lengths[:, None] + torch.arange(steps, device=DEVICE)]
    return _np({"tokens": tokens, "accepted_per_depth": accepted_per_depth, "proposed_per_depth": proposed_per_depth,
                "MTP.11/accepted_per_depth": accepted_per_depth, "MTP.11/proposed_per_depth": proposed_per_depth, **trace})
