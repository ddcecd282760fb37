"""MLA — Multi-head Latent Attention, one function per step of spec/mla.yaml.

The whole layer is :func:`mla_forward` (prefill, chunked prefill after a cached prefix,
and cached decode in the naive or the absorbed form); :func:`latent_attention_core` is the
FlashMLA-layout kernel contract on its own. Shapes use the config's names; ``batch``,
``seq`` (new tokens) and ``keys`` (visible key positions) are the runtime sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np
import numpy.typing as npt

from . import dsa  # the sparse (DSA) path; dsa refers to this module by name too, so either may be imported first
from .cache import Fp8LatentCache, LatentCache, NaiveCache, PagedLatentCache, gather_paged_rows, validate_block_table
from .config import ModelConfig
from .checks import all_finite, check_int_vector, check_tensor, compute_dtype, finite_output
from .errors import CacheError, InputError, ShapeError, shown
from .fp8_cache import check_latent_records, decode_latent_record
from .norm import rms_norm
from .fp8 import Fp8Linear, dense, linear
from .precision import exp, log, matmul
from .rope import apply_rope, rope_angles, softmax_scale
from .trace import Trace, emit
from .weights import attention_weight_shapes, check_weights, dequantize_checkpoint, fp8_tensors

# Bound on the elements of one [batch, head group, query_chunk, keys] logits block (MLA.9/MLA.14):
# 8 MiB in float32, small enough to stay in the CPU's cache through the softmax.
DEFAULT_LOGITS_ELEMENTS = 1 << 21
# Fewest queries per block by default: BLAS is slow on short products, so heads are split first.
DEFAULT_QUERY_CHUNK = 256
# Bound on the k_full elements of one group of heads in the naive form from latent rows (MLA.6-MLA.11).
DEFAULT_EXPANDED_ELEMENTS = 1 << 22


def query_latent(hidden: np.ndarray, weights: dict, eps: float) -> np.ndarray:
    """MLA.1 — compressed query ``c_q = RMSNorm(x @ Wq_a.T)`` (V2R eq. 12; V3R eq. 6)."""
    c_q = linear(hidden, weights["q_a_proj.weight"])  # [batch, seq, q_lora_rank]
    return rms_norm(c_q, weights["q_a_layernorm.weight"], eps)


def query_heads(config: ModelConfig, query_input: np.ndarray, weights: dict) -> tuple[np.ndarray, np.ndarray]:
    """MLA.2 — ``q = c_q @ Wq_b.T`` (or ``x @ Wq.T``), per head ``[nope | rope]`` (V2R eq. 13, 14; V3R eq. 7-8)."""
    weight = weights["q_b_proj.weight"] if config.q_lora_rank else weights["q_proj.weight"]
    q = linear(query_input, weight)  # [batch, seq, heads * qk_head_dim]
    q = q.reshape(q.shape[:-1] + (config.num_attention_heads, config.qk_head_dim))  # [batch, seq, heads, qk_head_dim]
    return q[..., : config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]


def kv_latent_and_rope_key(config: ModelConfig, hidden: np.ndarray, weights: dict) -> tuple[np.ndarray, np.ndarray]:
    """MLA.3 — ``[c_kv | k_pe] = x @ Wkv_a.T``; RMSNorm on the latent only (V2R eq. 9, 15; V3R eq. 1, 3)."""
    kv_a = linear(hidden, weights["kv_a_proj_with_mqa.weight"])  # [batch, seq, kv_lora_rank + qk_rope_head_dim]
    kv_latent = rms_norm(kv_a[..., : config.kv_lora_rank], weights["kv_a_layernorm.weight"], config.rms_norm_eps)
    return kv_latent, kv_a[..., config.kv_lora_rank:]  # [batch, seq, kv_lora_rank], [batch, seq, qk_rope_head_dim]


def rotate_query_key(config: ModelConfig, q_pe: np.ndarray, k_pe: np.ndarray, positions: np.ndarray,
                     table_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """MLA.4 — RoPE at absolute positions: q_pe per head, one k_pe shared by all heads (V2R eq. 14-15; V3R eq. 3, 8).

    ``table_dtype``: the precision of the cos / sin table (float64; float32 in a profile with ``rope_table: fp32``).
    """
    cos, sin = rope_angles(config, positions, q_pe.dtype, table_dtype)  # [batch, seq, rope_half]
    q_rotated = apply_rope(q_pe, cos[:, :, None, :], sin[:, :, None, :], config.rope_layout)  # [batch, seq, heads, rope]
    return q_rotated, apply_rope(k_pe, cos, sin, config.rope_layout)  # [batch, seq, qk_rope_head_dim]


def latent_cache_rows(kv_latent: np.ndarray, k_pe: np.ndarray) -> np.ndarray:
    """MLA.5 — one cache row per token: normalised latent then rotated k_pe (V2R sections 2.1.2-2.1.3)."""
    return np.concatenate([kv_latent, k_pe], axis=-1)  # [batch, seq, kv_lora_rank + qk_rope_head_dim]


def expand_latent(config: ModelConfig, kv_latent: np.ndarray, weights: dict) -> tuple[np.ndarray, np.ndarray]:
    """MLA.6 — ``kv = c_kv @ Wkv_b.T``, per head ``[k_nope | value]`` (V2R eq. 10-11; V3R eq. 2, 5).

    Computed per head with the W_UK / W_UV blocks of kv_b_proj into head-major buffers that
    attention reads without a copy; returned as ``[batch, keys, heads, ..]`` views. An FP8 kv_b_proj (the fp8
    profile's emulation, FP8.13) is one FP8 linear layer over all heads, as V3's naive path runs it.
    """
    if isinstance(weights["kv_b_proj.weight"], Fp8Linear):
        kv = linear(kv_latent, weights["kv_b_proj.weight"])  # [batch, keys, heads * (qk_nope_head_dim + v_head_dim)]
        kv = kv.reshape(kv.shape[:2] + (-1, config.qk_nope_head_dim + config.v_head_dim))  # [batch, keys, heads, nope + v]
        return kv[..., : config.qk_nope_head_dim], kv[..., config.qk_nope_head_dim:]
    w_uk, w_uv = _kv_b_heads(config, weights)  # [heads, nope, kv_lora_rank], [heads, v, kv_lora_rank]
    k_nope = matmul(kv_latent[:, None], w_uk.swapaxes(-1, -2))  # [batch, heads, keys, qk_nope_head_dim]
    value = matmul(kv_latent[:, None], w_uv.swapaxes(-1, -2))  # [batch, heads, keys, v_head_dim]
    return k_nope.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)


def assemble_query_key(q_nope: np.ndarray, q_pe: np.ndarray, k_nope: np.ndarray, k_pe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLA.7 — ``q = [q_nope ; q_pe]``, ``k = [k_nope ; k_pe]`` with k_pe broadcast to every head (V2R eq. 16, 17; V3R eq. 4, 9).

    Both are built in head-major buffers and returned as ``[batch, seq|keys, heads, qk_head_dim]`` views.
    """
    nope = q_nope.shape[-1]
    q_full = np.empty((q_nope.shape[0], q_nope.shape[2], q_nope.shape[1], nope + q_pe.shape[-1]), q_nope.dtype)
    q_full[..., :nope] = q_nope.transpose(0, 2, 1, 3)
    q_full[..., nope:] = q_pe.transpose(0, 2, 1, 3)
    k_full = np.empty((k_nope.shape[0], k_nope.shape[2], k_nope.shape[1], nope + k_pe.shape[-1]), k_nope.dtype)
    k_full[..., :nope] = k_nope.transpose(0, 2, 1, 3)
    k_full[..., nope:] = k_pe[:, None, :, :]  # the one k_pe of a token, for every head
    return q_full.transpose(0, 2, 1, 3), k_full.transpose(0, 2, 1, 3)


def causal_visibility(key_offsets: np.ndarray, query_lengths: np.ndarray, num_queries: int, num_keys: int) -> np.ndarray:
    """MLA.8 — bottom-right causal mask: query i of sequence b sees key j iff ``j <= key_offsets[b] + i``.

    ``key_offsets[b]`` keys precede the new tokens (the cached prefix); queries at or past
    ``query_lengths[b]`` are padding and see nothing.
    """
    queries = np.arange(num_queries)[None, :, None]  # [1, seq, 1]
    keys = np.arange(num_keys)[None, None, :]  # [1, 1, keys]
    valid_query = queries < query_lengths[:, None, None]
    return valid_query & (keys <= key_offsets[:, None, None] + queries)  # [batch, seq, keys]


def attention_logits(q_full: np.ndarray, k_heads: np.ndarray, scale: float) -> np.ndarray:
    """MLA.9 — ``scale * <q_full[i, h], k_full[j, h]>`` with k head-major ``[batch, heads, keys, qk_head_dim]`` (V2R eq. 18; V3R eq. 10)."""
    logits = matmul(q_full.transpose(0, 2, 1, 3), k_heads.swapaxes(-1, -2))  # [batch, heads, seq, keys]
    logits *= scale
    return logits


def masked_softmax(logits: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLA.10 — softmax over visible keys and its natural-log LSE; a row with no visible key gives p = 0, lse = -inf."""
    probs = logits.copy(order="K")  # [batch, heads, seq, keys] in the memory order of logits, rewritten in place below
    np.copyto(probs, -np.inf, where=~visible)
    row_max = probs.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max[~np.isfinite(row_max)] = 0.0
    np.subtract(probs, row_max, out=probs)
    exp(probs, out=probs)
    total = probs.sum(axis=-1, keepdims=True)
    empty = total == 0.0
    np.divide(probs, np.where(empty, 1.0, total), out=probs)
    with np.errstate(divide="ignore"):
        lse = log(total[..., 0]) + row_max[..., 0]  # [batch, heads, seq]; -inf for an empty row
    return probs, lse


def attention_values(probs: np.ndarray, value_heads: np.ndarray) -> np.ndarray:
    """MLA.11 — ``o[i, h] = sum_j p[h, i, j] v[j, h]`` with v head-major ``[batch, heads, keys, v_head_dim]`` (V2R eq. 18)."""
    return matmul(probs, value_heads).transpose(0, 2, 1, 3)  # [batch, seq, heads, v_head_dim]


def output_projection(attn: np.ndarray, weights: dict) -> np.ndarray:
    """MLA.12 — head-major concat, then ``@ Wo.T`` (V2R eq. 19; V3R eq. 11)."""
    flat = attn.reshape(attn.shape[:2] + (attn.shape[2] * attn.shape[3],))  # [batch, seq, heads * v_head_dim]
    return linear(flat, weights["o_proj.weight"])  # [batch, seq, hidden_size]


def _kv_b_heads(config: ModelConfig, weights: dict) -> tuple[np.ndarray, np.ndarray]:
    """W_UK ``[heads, qk_nope_head_dim, kv_lora_rank]`` and W_UV ``[heads, v_head_dim, kv_lora_rank]``: per-head slices of kv_b_proj."""
    per_head = dense(weights["kv_b_proj.weight"]).reshape(-1, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)
    return per_head[:, : config.qk_nope_head_dim], per_head[:, config.qk_nope_head_dim:]


def absorb_query(config: ModelConfig, q_nope: np.ndarray, q_pe: np.ndarray, weights: dict) -> tuple[np.ndarray, np.ndarray]:
    """MLA.13 — fold W_UK into the query: ``q_absorbed = q_nope @ W_UK``; ``q_latent = [q_absorbed | q_pe]`` (V2R section 2.1.2)."""
    w_uk, _ = _kv_b_heads(config, weights)
    q_absorbed = matmul(q_nope.transpose(0, 2, 1, 3), w_uk).transpose(0, 2, 1, 3)  # [batch, seq, heads, kv_lora_rank]
    return q_absorbed, np.concatenate([q_absorbed, q_pe], axis=-1)  # [.., kv_lora_rank + qk_rope_head_dim]


def latent_logits(q_latent: np.ndarray, key_rows: np.ndarray, scale: float) -> np.ndarray:
    """MLA.14 — ``scale * (q_absorbed . latent + q_pe . k_pe)``: one MQA product against the shared rows."""
    batch, seq, heads, width = q_latent.shape
    logits = matmul(q_latent.reshape(batch, seq * heads, width), key_rows.transpose(0, 2, 1))  # [batch, seq * heads, keys]
    logits *= scale
    return logits.reshape(batch, seq, heads, key_rows.shape[1]).transpose(0, 2, 1, 3)  # [batch, heads, seq, keys]


def latent_values(probs: np.ndarray, key_rows: np.ndarray, head_dim_v: int) -> np.ndarray:
    """MLA.15 — ``o_latent = p @ latent``: the values are the first ``head_dim_v`` columns of each row; one MQA product, as MLA.14."""
    batch, heads, seq, keys = probs.shape
    per_query = probs.transpose(0, 2, 1, 3).reshape(batch, seq * heads, keys)  # [batch, seq * heads, keys]
    return matmul(per_query, key_rows[:, :, :head_dim_v]).reshape(batch, seq, heads, head_dim_v)


def unabsorb_output(config: ModelConfig, out_latent: np.ndarray, weights: dict) -> np.ndarray:
    """MLA.16 — apply W_UV per head: ``o = o_latent @ W_UV.T`` (V2R section 2.1.2: W_UV absorbed into W_O)."""
    _, w_uv = _kv_b_heads(config, weights)
    return matmul(out_latent.transpose(0, 2, 1, 3), w_uv.swapaxes(-1, -2)).transpose(0, 2, 1, 3)  # [batch, seq, heads, v_head_dim]


def _check_used_rows(name: str, rows: np.ndarray, lengths: np.ndarray, allow_nonfinite: bool, spec_id: str) -> None:
    """Cached rows ``[batch, keys, ...]`` a sequence holds (``t < lengths[b]``) must be finite; unused slots may hold anything."""
    if allow_nonfinite:
        return
    used = np.arange(rows.shape[1])[None, :] < lengths[:, None]  # [batch, keys]
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = used & ~np.isfinite(rows.sum(axis=tuple(range(2, rows.ndim))))  # a finite row sum proves the row finite
    bad = suspect & ~np.isfinite(rows).all(axis=tuple(range(2, rows.ndim))) if suspect.any() else suspect
    if bad.any():
        batch, position = (int(i) for i in np.argwhere(bad)[0])
        raise InputError(name, f"row of sequence {batch} at position {position} (< its length {int(lengths[batch])}) is not finite; "
                         "pass allow_nonfinite=True to accept NaN/Inf", spec_id)


def _attention_blocks(visible: np.ndarray, heads: int, query_chunk: int | None, trace: Trace | None, split_heads: bool):
    """(head slice, query slice, key count) blocks covering ``[heads, seq]``: plumbing that bounds memory.

    Keys past the last one visible to a query chunk are skipped (causal saving). A logits
    block ``[batch, head group, query chunk, keys]`` holds about DEFAULT_LOGITS_ELEMENTS values
    (it then stays in the CPU's cache). With ``split_heads`` (per-head products, MLA.9) a
    default query chunk has at least DEFAULT_QUERY_CHUNK queries, since BLAS is slow on short
    products, and heads are grouped to fit; without (one MQA product for all heads, MLA.14)
    only queries are chunked. An explicit ``query_chunk`` is used as given. With a trace there
    is one block, so every step is recorded whole.
    """
    batch, seq, keys = visible.shape
    if trace is not None or seq == 0:
        return [(slice(0, heads), slice(0, seq), keys)]
    if query_chunk is None:
        query_chunk = max(DEFAULT_QUERY_CHUNK if split_heads else 1, DEFAULT_LOGITS_ELEMENTS // max(1, batch * heads * keys))
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, (int, np.integer)) or query_chunk < 1:
        raise InputError("query_chunk", f"expected an int >= 1, got {query_chunk!r}", "MLA.9")
    head_group = max(1, DEFAULT_LOGITS_ELEMENTS // max(1, batch * query_chunk * keys)) if split_heads else heads
    blocks = []
    for start in range(0, seq, query_chunk):
        seen = np.flatnonzero(visible[:, start:start + query_chunk].any(axis=(0, 1)))
        used = int(seen[-1]) + 1 if seen.size else 0
        blocks += [(slice(h, h + head_group), slice(start, start + query_chunk), used) for h in range(0, heads, head_group)]
    return blocks


def _unused_keys_zeroed(rows: np.ndarray, key_used: np.ndarray) -> np.ndarray:
    """``rows`` with the keys no query sees set to 0 (``key_used`` broadcasts against ``rows``).

    ``rows`` itself when every key is used (prefill, decode), else one copy: unused slots may hold NaN.
    """
    return rows if key_used.all() else np.where(key_used, rows, 0.0)


def naive_attention(q_full: np.ndarray, k_full: np.ndarray, value: np.ndarray, visible: np.ndarray, scale: float,
                    query_chunk: int | None = None, trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MLA.9 -> MLA.10 -> MLA.11 over blocks of heads and queries; returns ``o [batch, seq, heads, v]``, ``lse [batch, heads, seq]``."""
    key_used = visible.any(axis=1)[:, None, :, None]  # [batch, 1, keys, 1]
    k_heads = _unused_keys_zeroed(k_full.transpose(0, 2, 1, 3), key_used)  # [batch, heads, keys, qk_head_dim]
    value_heads = _unused_keys_zeroed(value.transpose(0, 2, 1, 3), key_used)  # [batch, heads, keys, v_head_dim]
    batch, seq, heads, _ = q_full.shape
    out = np.empty((batch, seq, heads, value.shape[-1]), q_full.dtype)  # [batch, seq, heads, v_head_dim]
    lse = np.empty((batch, heads, seq), q_full.dtype)
    for group, chunk, used in _attention_blocks(visible, heads, query_chunk, trace, split_heads=True):
        logits = emit(trace, "MLA.9", attention_logits(q_full[:, chunk, group], k_heads[:, group, :used], scale))
        probs, lse[:, group, chunk] = emit(trace, "MLA.10", *masked_softmax(logits, visible[:, None, chunk, :used]))
        out[:, chunk, group] = emit(trace, "MLA.11", attention_values(probs, value_heads[:, group, :used]))
    return out, lse


def naive_attention_from_latent(config: ModelConfig, weights: dict, q_nope: np.ndarray, q_pe: np.ndarray, key_rows: np.ndarray,
                                visible: np.ndarray, scale: float, query_chunk: int | None = None,
                                trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MLA.6 -> MLA.7 -> MLA.9-11 from latent rows ``[batch, keys, kv_lora_rank + rope]``, one group of heads at a time.

    Heads are independent from MLA.6 to MLA.11, so the per-head keys and values (the largest
    buffers of a long prefill) exist for one group at a time: about DEFAULT_EXPANDED_ELEMENTS
    values of k_full per group (the kv_b_proj rows of a group are its heads' rows). With a
    trace there is one group, so every step is recorded whole.
    """
    batch, seq, heads, _ = q_nope.shape
    rank, keys = config.kv_lora_rank, key_rows.shape[1]
    group = heads if trace is not None else max(1, DEFAULT_EXPANDED_ELEMENTS // max(1, batch * keys * config.qk_head_dim))
    kv_b_proj = weights["kv_b_proj.weight"]
    kv_b_rows = dense(kv_b_proj).reshape(heads, -1, rank)  # [heads, qk_nope_head_dim + v_head_dim, kv_lora_rank]
    attn = np.empty((batch, seq, heads, config.v_head_dim), q_nope.dtype)  # [batch, seq, heads, v_head_dim]
    lse = np.empty((batch, heads, seq), q_nope.dtype)
    for start in range(0, heads, group):
        h = slice(start, start + group)
        group_weights = {"kv_b_proj.weight": kv_b_proj if group == heads else kv_b_rows[h].reshape(-1, rank)}
        k_nope, value = emit(trace, "MLA.6", *expand_latent(config, key_rows[..., :rank], group_weights))
        q_full, k_full = emit(trace, "MLA.7", *assemble_query_key(q_nope[:, :, h], q_pe[:, :, h], k_nope, key_rows[..., rank:]))
        attn[:, :, h], lse[:, h] = naive_attention(q_full, k_full, value, visible, scale, query_chunk, trace)  # MLA.9-11
    return attn, lse


def latent_attention(q_latent: np.ndarray, key_rows: np.ndarray, visible: np.ndarray, scale: float, head_dim_v: int,
                     query_chunk: int | None = None, trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MLA.14 -> MLA.10 -> MLA.15 over blocks of queries; returns ``o_latent [batch, seq, heads, head_dim_v]``, ``lse``."""
    key_rows = _unused_keys_zeroed(key_rows, visible.any(axis=1)[..., None])  # [batch, keys, width]
    batch, seq, heads, _ = q_latent.shape
    out = np.empty((batch, seq, heads, head_dim_v), q_latent.dtype)  # [batch, seq, heads, head_dim_v]
    lse = np.empty((batch, heads, seq), q_latent.dtype)
    for _, chunk, used in _attention_blocks(visible, heads, query_chunk, trace, split_heads=False):
        logits = emit(trace, "MLA.14", latent_logits(q_latent[:, chunk], key_rows[:, :used], scale))
        probs, lse[:, :, chunk] = emit(trace, "MLA.10", *masked_softmax(logits, visible[:, None, chunk, :used]))
        out[:, chunk] = emit(trace, "MLA.15", latent_values(probs, key_rows[:, :used], head_dim_v))
    return out, lse


def latent_attention_core(q: np.ndarray, k_cache: np.ndarray, block_table: np.ndarray, cache_seqlens: np.ndarray, head_dim_v: int,
                          softmax_scale: float, causal: bool = False, *, query_chunk: int | None = None,
                          dtype: npt.DTypeLike = np.float64, allow_nonfinite: bool = False,
                          trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MLA.17 — the latent attention kernel in the FlashMLA layout (``flash_mla_with_kvcache``).

    ``q [batch, s_q, heads, width]`` (width = kv_lora_rank + qk_rope_head_dim = 576 for V3:
    ``[q_absorbed | q_pe]``), ``k_cache [num_blocks, block_size, 1, width]`` paged rows,
    ``block_table [batch, max_blocks]``, ``cache_seqlens [batch]`` (keys per sequence, the new
    ones included). Values are the first ``head_dim_v`` columns of each row. ``causal``:
    query i sees key j iff ``j <= cache_seqlens - s_q + i`` (bottom-right; no effect when
    s_q = 1). ``softmax_scale`` is required: FlashMLA's default 576^-0.5 is wrong for
    DeepSeek. Returns ``out [batch, s_q, heads, head_dim_v]`` and the natural-log
    ``lse [batch, heads, s_q]``; a query with no visible key gets out 0 and lse -inf.
    Unused cache slots are never read, so they may hold NaN. A uint8 ``k_cache [num_blocks,
    block_size, 1, record_width]`` is FlashMLA's FP8 cache (FP8.12): 656-byte records for V3
    (FP8.10), gathered, then decoded (FP8.11) to the rows the attention reads.
    """
    dtype = compute_dtype(dtype)
    q = check_tensor("q", q, ("batch", "s_q", "heads", "width"), "MLA.17", dtype, allow_nonfinite)
    batch, s_q, heads, width = q.shape
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, (int, np.integer)) or not 0 < head_dim_v <= width:
        raise InputError("head_dim_v", f"expected an int in 1 .. {width}, got {shown(head_dim_v)}", "MLA.17")
    records = np.asarray(k_cache).dtype == np.uint8  # FP8.12: 656-byte records, the latent being the first head_dim_v columns
    if records:
        cache = check_latent_records("k_cache", k_cache, head_dim_v, width - head_dim_v, "FP8.12", rank_name="head_dim_v")
    else:
        cache = check_tensor("k_cache", k_cache, ("num_blocks", "block_size", 1, width), "MLA.17", dtype, allow_nonfinite=True)
    seqlens = check_int_vector("cache_seqlens", cache_seqlens, batch, "MLA.17")
    table = np.asarray(block_table)
    if table.ndim != 2 or table.shape[0] != batch:
        raise ShapeError("block_table", f"expected [{batch}, max_blocks], got {list(table.shape)}", "MLA.19")
    validate_block_table(table, cache.shape[0], cache.shape[1], seqlens)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (float, int, np.floating, np.integer))
            or not (math.isfinite(softmax_scale) and softmax_scale > 0)):
        raise InputError("softmax_scale", f"expected a finite float > 0 (the model's scale, e.g. 0.1352337788608801 for V3), got {shown(softmax_scale)}", "MLA.17")
    if not isinstance(causal, (bool, np.bool_)):
        raise InputError("causal", f"expected a bool, got {shown(causal)} ({type(causal).__name__})", "MLA.17")
    q = q if trace is None else trace.round_input(q)
    cache = cache if trace is None else trace.round_input(cache)
    key_rows = emit(trace, "MLA.19", gather_paged_rows(cache, table.astype(np.int64), seqlens))  # [batch, keys, width or record]
    if records:
        key_rows = emit(trace, "FP8.11", decode_latent_record(key_rows, head_dim_v, width - head_dim_v).astype(dtype))  # [batch, keys, width]
    _check_used_rows("k_cache", key_rows, seqlens, allow_nonfinite, "MLA.17")
    keys = key_rows.shape[1]
    if causal:
        visible = causal_visibility(seqlens - s_q, np.full(batch, s_q), s_q, keys)  # MLA.8
    else:
        visible = np.broadcast_to((np.arange(keys)[None, :] < seqlens[:, None])[:, None, :], (batch, s_q, keys))
    visible = emit(trace, "MLA.8", visible)
    out, lse = latent_attention(q, key_rows, visible, float(softmax_scale), int(head_dim_v), query_chunk, trace)
    out = out if allow_nonfinite else finite_output("out", out, "MLA.17")
    return emit(trace, "MLA.17", out, lse)


@dataclasses.dataclass(frozen=True)
class MLAResult:
    """``output [batch, seq, hidden_size]``, the updated cache (None without one), ``lse [batch, heads, seq]`` and, with
    DSA, the selected key positions ``indices [batch, seq, selected]`` (DSA.10; None for dense MLA)."""

    output: np.ndarray
    cache: LatentCache | PagedLatentCache | Fp8LatentCache | NaiveCache | dsa.SparseCache | None
    lse: np.ndarray
    indices: np.ndarray | None = None


def mla_forward(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: np.ndarray,
                start_positions: npt.ArrayLike | None = None,
                cache: LatentCache | PagedLatentCache | Fp8LatentCache | NaiveCache | dsa.SparseCache | None = None, *,
                attention: str | None = None, query_lengths: npt.ArrayLike | None = None, query_chunk: int | None = None,
                indexer_fp8: bool = False, forced_indices: npt.ArrayLike | None = None, dtype: npt.DTypeLike = np.float64,
                allow_nonfinite: bool = False, trace: Trace | None = None) -> MLAResult:
    """One MLA layer: prefill, prefill after a cached prefix, or cached decode (spec/mla.yaml).

    ``weights``: the attention tensors under names relative to ``self_attn.``.
    ``hidden [batch, seq, hidden_size]``: new tokens; token i of sequence b sits at position
    ``start_positions[b] + i`` (default: the cache lengths, else 0). With a cache,
    ``start_positions`` must equal the cache lengths; keys are the cached positions plus
    the new tokens. ``query_lengths [batch]`` marks right padding (default all ``seq``):
    padded tokens produce 0 and are not cached. ``attention``: ``naive`` (per-head k, v) or
    ``absorbed`` (latent rows); default naive without a cache or with a NaiveCache,
    absorbed with a latent cache.

    A config with ``index_topk`` runs DeepSeek Sparse Attention (spec/dsa.yaml): the indexer
    (DSA.1-DSA.10; ``indexer_fp8``, or a trace whose profile sets it, switches DSA.6's FP8 on) selects the keys each query
    attends to, the absorbed form gathers their latent rows (DSA.11-DSA.12) and the naive form
    masks the others out; its cache is a :class:`mla_ref.dsa.SparseCache`. ``forced_indices [batch, seq, selected]``
    replaces the indexer's selection (teacher forcing, TOLERANCE.4).
    """
    w, x, starts, lengths, attention = _prepare(config, weights, hidden, start_positions, cache, attention,
                                                query_lengths, dtype, allow_nonfinite, trace)
    if not isinstance(indexer_fp8, (bool, np.bool_)):
        raise InputError("indexer_fp8", f"expected a bool, got {shown(indexer_fp8)}", "DSA.6")
    batch, seq, _ = x.shape
    scale = softmax_scale(config)
    positions = starts[:, None] + np.arange(seq)[None, :]  # [batch, seq]
    query_input = emit(trace, "MLA.1", query_latent(x, w, config.rms_norm_eps)) if config.q_lora_rank else x
    q_nope, q_pe_raw = emit(trace, "MLA.2", *query_heads(config, query_input, w))  # [batch, seq, heads, nope], [.., rope]
    kv_latent, k_pe_raw = emit(trace, "MLA.3", *kv_latent_and_rope_key(config, x, w))  # [batch, seq, kv_lora_rank], [.., rope]
    table_dtype = np.float64 if trace is None else trace.rope_table
    q_pe, k_pe = emit(trace, "MLA.4", *rotate_query_key(config, q_pe_raw, k_pe_raw, positions, table_dtype))  # rotated, same shapes
    new_rows = emit(trace, "MLA.5", latent_cache_rows(kv_latent, k_pe))  # [batch, seq, kv_lora_rank + rope]
    if config.sparse_attention:  # DSA.1-DSA.6: [batch, seq, index_heads, index_dim], [batch, seq, index_dim], [batch, seq, index_heads]
        quantize = indexer_fp8 or (trace is not None and trace.indexer_fp8)  # DSA.6: asked for, or a precision effect of the profile
        q_hat, k_hat, head_weights = dsa.indexer_query_key(config, w, x, query_input, positions, quantize, table_dtype, trace)
    key_offsets = np.zeros(batch, np.int64) if cache is None else cache.lengths  # keys before the new tokens
    if isinstance(cache, NaiveCache):
        k_nope, value = emit(trace, "MLA.6", *expand_latent(config, kv_latent, w))  # the new tokens only
        q_full, k_full = emit(trace, "MLA.7", *assemble_query_key(q_nope, q_pe, k_nope, k_pe))
        cache = cache.append(k_full, value, lengths)  # MLA.18
        k_full, value = cache.keys_values()  # [batch, keys, heads, qk_head_dim], [.., v_head_dim]
        for rows in (k_full, value):
            _check_used_rows("cache", rows, cache.lengths, allow_nonfinite, "MLA.18")
    else:
        if isinstance(cache, dsa.SparseCache):
            cache = cache.append(new_rows, k_hat, lengths)  # MLA.18, DSA.7
        else:
            cache = None if cache is None else cache.append(new_rows, lengths)  # MLA.18
        key_rows = new_rows if cache is None else cache.key_rows()  # [batch, keys, kv_lora_rank + rope]
        if cache is None and trace is not None and trace.latent_cache_fp8(config):  # FP8.12: V3.2 reads a prefill's rows back from FP8
            key_rows = Fp8LatentCache.empty(config, batch, x.dtype).append(new_rows, np.full(batch, seq)).key_rows()
        if cache is not None:
            _check_used_rows("cache", key_rows, cache.lengths, allow_nonfinite, "MLA.18")
    if cache is not None:
        emit(trace, "MLA.18", cache.lengths)
    num_keys = k_full.shape[1] if isinstance(cache, NaiveCache) else key_rows.shape[1]
    visible = emit(trace, "MLA.8", causal_visibility(key_offsets, lengths, seq, num_keys))  # [batch, seq, keys]
    if config.sparse_attention:
        index_keys = k_hat if cache is None else dsa.stored_index_keys(cache.index_key_rows(), quantize)  # [batch, keys, index_dim]
        indices, _ = dsa.select_keys(config, q_hat, index_keys, head_weights, visible, trace=trace, forced_indices=forced_indices)  # DSA.8-DSA.10
        if attention != "absorbed":
            visible = visible & dsa.selected_visibility(indices, num_keys)  # the index mask narrows MLA.10
    if attention == "absorbed":
        q_absorbed, q_latent = emit(trace, "MLA.13", *absorb_query(config, q_nope, q_pe, w))  # [.., kv_lora_rank (+ rope)]
        if config.sparse_attention:
            out_latent, lse = dsa.sparse_attention(q_latent, key_rows, indices, scale, config.kv_lora_rank, query_chunk, trace)
        else:
            out_latent, lse = latent_attention(q_latent, key_rows, visible, scale, config.kv_lora_rank, query_chunk, trace)
        attn = emit(trace, "MLA.16", unabsorb_output(config, out_latent, w))  # [batch, seq, heads, v_head_dim]
    elif isinstance(cache, NaiveCache):
        attn, lse = naive_attention(q_full, k_full, value, visible, scale, query_chunk, trace)  # MLA.9-11
    else:
        attn, lse = naive_attention_from_latent(config, w, q_nope, q_pe, key_rows, visible, scale, query_chunk, trace)  # MLA.6-7, MLA.9-11
    output = emit(trace, "MLA.12", output_projection(attn, w))  # [batch, seq, hidden_size]
    if not allow_nonfinite:
        _finite_steps(("MLA.2", q_nope), ("MLA.3", kv_latent), ("MLA.16" if attention == "absorbed" else "MLA.11", attn), ("MLA.12", output))
    return MLAResult(output, cache, lse, indices if config.sparse_attention else None)


def _finite_steps(*outputs: tuple[str, np.ndarray]) -> None:
    """NumericError naming the first step whose output is not finite, when the last one is not (finite inputs were checked)."""
    if all_finite(outputs[-1][1]):
        return
    step, array = next((step, array) for step, array in outputs if not all_finite(array))
    finite_output("output" if step == outputs[-1][0] else f"{step} output", array, step)


def _prepare(config, weights, hidden, start_positions, cache, attention, query_lengths, dtype, allow_nonfinite, trace):
    """Validate the inputs of :func:`mla_forward`; return them cast to ``dtype`` (and rounded per the trace's profile)."""
    dtype = compute_dtype(dtype)
    fp8 = fp8_tensors(weights)  # an FP8 checkpoint: {name: (codes, weight_scale_inv)} (FP8.13)
    w = check_weights(attention_weight_shapes(config), dequantize_checkpoint(weights) if fp8 else weights, "MLA.weights", dtype)
    x = check_tensor("hidden", hidden, ("batch", "seq", config.hidden_size), "MLA.1", dtype, allow_nonfinite)
    if trace is not None:
        w = {name: trace.weight(value, fp8.get(name)) for name, value in w.items()}
        x = trace.round_input(x)
    batch, seq, _ = x.shape
    if cache is not None:
        if config.sparse_attention and not isinstance(cache, dsa.SparseCache):
            raise CacheError("cache", f"expected a SparseCache (latent rows and the indexer's keys: the config sets index_topk), "
                             f"got {type(cache).__name__}", "DSA.7")
        if not isinstance(cache, (LatentCache, PagedLatentCache, Fp8LatentCache, NaiveCache, dsa.SparseCache)):
            raise CacheError("cache", f"expected LatentCache, PagedLatentCache, Fp8LatentCache, NaiveCache or SparseCache, got {type(cache).__name__}", "MLA.18")
        cache.check(config, batch)
        if cache.dtype != dtype:
            raise CacheError("cache", f"expected dtype {dtype} (the compute dtype), got {cache.dtype}: build it with dtype={dtype.name}", "MLA.18")
    lengths = np.full(batch, seq, np.int64) if query_lengths is None else check_int_vector("query_lengths", query_lengths, batch, "MLA.8")
    if (lengths > seq).any():
        raise InputError("query_lengths", f"expected values <= seq = {seq}, got {lengths.tolist()}", "MLA.8")
    if start_positions is None:
        starts = np.zeros(batch, np.int64) if cache is None else cache.lengths.astype(np.int64)
    else:
        starts = check_int_vector("start_positions", start_positions, batch, "MLA.4")
        if cache is not None and not np.array_equal(starts, cache.lengths):
            raise CacheError("start_positions", f"expected the cache lengths {cache.lengths.tolist()}, got {starts.tolist()}", "MLA.18")
    last = starts + np.maximum(lengths, 1) - 1
    if (last >= config.max_position_embeddings).any():
        bad = int(np.argmax(last >= config.max_position_embeddings))
        raise InputError("positions", f"sequence {bad} reaches position {int(last[bad])}, expected < max_position_embeddings = {config.max_position_embeddings}", "MLA.4")
    if attention is None:
        attention = "absorbed" if isinstance(cache, (LatentCache, PagedLatentCache, Fp8LatentCache, dsa.SparseCache)) else "naive"
    if attention not in ("naive", "absorbed"):
        raise InputError("attention", f"expected 'naive' or 'absorbed', got {attention!r}", "MLA.13")
    if attention == "absorbed" and isinstance(cache, NaiveCache):
        raise CacheError("cache", "absorbed attention needs a latent cache (LatentCache or PagedLatentCache), got NaiveCache", "MLA.13")
    return w, x, starts, lengths, attention
