"""A Triton kernel for the absorbed MLA decode core (MLA.17, FlashMLA layout), behind the adapter protocol.

What it computes (spec/mla.yaml MLA.19 -> MLA.8 -> MLA.14 -> MLA.10 -> MLA.15):

    q        [batch, s_q, heads, width]            width = kv_lora_rank + qk_rope_head_dim ([q_absorbed | q_pe])
    k_cache  [num_blocks, block_size, 1, width]    paged latent rows [kv_latent | k_pe]
    block_table [batch, max_blocks] (-1 = none), cache_seqlens [batch]
    out      [batch, s_q, heads, head_dim_v]       values = the first head_dim_v columns of each row
    lse      [batch, heads, s_q]                   natural log; -inf (and out 0) for a query with no visible key

Query i of sequence b sees key j iff ``j < seqlen`` and, when causal, ``j <= seqlen - s_q + i``
(bottom-right aligned). The query heads and the s_q draft tokens are folded into one row axis
(``row = i * heads + h``) because every head reads the same single latent KV head.

The kernel walks the keys of one sequence in tiles of BLOCK_N, finds each key's physical slot
through the block table (so any page size works, 1 included), and keeps an online softmax in
fp32: running max ``m`` (base-2 units: logits are prescaled by ``softmax_scale * log2(e)``),
running sum ``l`` and the unnormalised output ``acc``. Slots at or past ``seqlen`` are never
loaded: every load is masked, nothing is multiplied by zero to hide garbage (unused slots may
hold NaN). Split-KV: ``splits`` programs per (sequence, row block), each over a contiguous run
of key tiles, write a normalised partial output and its LSE; a second kernel merges them by LSE,
giving an empty split (-inf LSE) weight 0 without reading its partial output.

Precision: operands are loaded in the input dtype and upcast to fp32; both products run as fp32
``tl.dot`` with ``input_precision="ieee"`` (no TF32). With bfloat16 inputs the probabilities are
rounded to bf16 before P.V, as FlashMLA does, and ``out`` is returned in bf16; logits, the
softmax statistics, partial outputs and the LSE stay fp32. The bf16 rounding of P is integer
bit arithmetic (round to nearest, ties to even): Triton 3.7's interpreter converts fp32 -> bf16
by truncation and computes garbage for bf16 arithmetic, so the kernel never relies on either.

Settings the protocol's arguments do not carry are module settings: ``configure(dtype, splits)``,
or at import ``MLA_REF_TRITON_DTYPE`` (float32 | bfloat16, default float32) and
``MLA_REF_TRITON_SPLITS`` (programs per sequence over the keys, default 1 = no split).
``PROFILE`` names the matching precision profile. Without a GPU, set ``TRITON_INTERPRET=1``
before triton is imported (this module sets it when CUDA is absent and the variable is unset):

    TRITON_INTERPRET=1 mla-ref check examples/triton_mla_decode.py --select mla.core
    TRITON_INTERPRET=1 MLA_REF_TRITON_DTYPE=bfloat16 MLA_REF_TRITON_SPLITS=3 \\
        mla-ref check examples/triton_mla_decode.py --profile bf16 --select mla.core
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # no GPU: run the kernels through Triton's CPU interpreter

import triton  # noqa: E402 - must follow the interpreter switch
import triton.language as tl  # noqa: E402

from mla_ref import Unsupported  # noqa: E402

PROFILES = {"float32": "fp32", "bfloat16": "bf16"}
DTYPE, SPLITS, PROFILE = "float32", 1, "fp32"
BLOCK_M = 16  # query rows (heads x draft tokens) per program; 16 is tl.dot's smallest tile
BLOCK_N = 16  # keys per tile
LN2 = math.log(2.0)


def configure(dtype: str = "float32", splits: int = 1) -> None:
    """Choose the input dtype and the number of key splits for every later call; sets PROFILE."""
    global DTYPE, SPLITS, PROFILE
    if dtype not in PROFILES:
        raise ValueError(f"MLA_REF_TRITON_DTYPE: expected one of {sorted(PROFILES)}, got {dtype!r}")
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"MLA_REF_TRITON_SPLITS: expected an integer >= 1, got {splits!r}")
    DTYPE, SPLITS, PROFILE = dtype, int(splits), PROFILES[dtype]


def _env_splits() -> int:
    text = os.environ.get("MLA_REF_TRITON_SPLITS", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"MLA_REF_TRITON_SPLITS: expected an integer >= 1, got {text!r}") from None


configure(os.environ.get("MLA_REF_TRITON_DTYPE", "float32"), _env_splits())


DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda"  # fixed when the kernels below are decorated


# ---------------------------------------------------------------------------- kernels

@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bfloat16 (ties to even), returned as fp32; NaN-free inputs only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _latent_attention_split_kernel(
    q_ptr, cache_ptr, table_ptr, seqlens_ptr, out_part_ptr, lse_part_ptr,
    scale_log2,                               # softmax_scale * log2(e)
    s_q, heads, rows, head_dim_v, rope_dim, block_size, num_splits,
    stride_qb, stride_qs, stride_qh,          # q [batch, s_q, heads, width], unit last stride
    stride_cb, stride_cs,                     # k_cache [num_blocks, block_size, 1, width], unit last stride
    stride_tb,                                # block_table [batch, max_blocks]
    stride_ob, stride_os, stride_or,          # out_part [batch, splits, rows, head_dim_v]
    stride_lb, stride_ls,                     # lse_part [batch, splits, rows]
    CAUSAL: tl.constexpr, ROUND_P_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    """One (sequence, row block, key split): online softmax over the split's key tiles."""
    batch_index = tl.program_id(0)
    split = tl.program_id(2)
    seqlen = tl.load(seqlens_ptr + batch_index)

    row = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M], row = query_index * heads + head
    row_ok = row < rows
    query_index = row // heads
    head = row % heads
    dv = tl.arange(0, BLOCK_DV)  # value / latent columns
    dr = tl.arange(0, BLOCK_DR)  # rope columns, after the latent ones
    dv_ok = dv < head_dim_v
    dr_ok = dr < rope_dim

    q_row_ptr = q_ptr + batch_index * stride_qb + query_index * stride_qs + head * stride_qh  # [BLOCK_M]
    q_latent = tl.load(q_row_ptr[:, None] + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    q_latent = q_latent.to(tl.float32)  # [BLOCK_M, BLOCK_DV]
    q_rope = tl.load(q_row_ptr[:, None] + head_dim_v + dr[None, :], mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
    q_rope = q_rope.to(tl.float32)  # [BLOCK_M, BLOCK_DR]

    # This split's keys: a contiguous run of whole tiles, cut at seqlen (never past it).
    tiles_per_split = tl.cdiv(tl.cdiv(seqlen, BLOCK_N), num_splits)
    key_start = split * tiles_per_split * BLOCK_N
    key_end = tl.minimum(key_start + tiles_per_split * BLOCK_N, seqlen)
    if CAUSAL:
        last_visible = seqlen - s_q + query_index  # [BLOCK_M], bottom-right aligned
        # keys that no real row of this block may see are not even loaded
        key_end = tl.minimum(key_end, seqlen - s_q + (tl.minimum(tl.program_id(1) * BLOCK_M + BLOCK_M, rows) - 1) // heads + 1)
    else:
        last_visible = tl.zeros([BLOCK_M], dtype=tl.int32) + (seqlen - 1)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - m)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # running sum of exp2(logit - m) * value
    for key0 in range(key_start, key_end, BLOCK_N):
        key = key0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] logical positions
        held = key < key_end
        block = tl.load(table_ptr + batch_index * stride_tb + key // block_size, mask=held, other=-1)
        held = held & (block >= 0)
        slot_ptr = cache_ptr + block.to(tl.int64) * stride_cb + (key % block_size) * stride_cs  # [BLOCK_N]
        k_latent = tl.load(slot_ptr[:, None] + dv[None, :], mask=held[:, None] & dv_ok[None, :], other=0.0)
        k_latent = k_latent.to(tl.float32)  # [BLOCK_N, BLOCK_DV], the values too
        k_rope = tl.load(slot_ptr[:, None] + head_dim_v + dr[None, :], mask=held[:, None] & dr_ok[None, :], other=0.0)
        k_rope = k_rope.to(tl.float32)  # [BLOCK_N, BLOCK_DR]

        logits = tl.dot(q_latent, tl.trans(k_latent), input_precision="ieee")
        logits += tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        visible = held[None, :] & (key[None, :] <= last_visible[:, None])
        logits = tl.where(visible, logits * scale_log2, float("-inf"))

        m_new = tl.maximum(m, tl.max(logits, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
        alpha = tl.exp2(m - m_base)  # [BLOCK_M] rescales what was summed under the old max
        p = tl.exp2(logits - m_base[:, None])  # [BLOCK_M, BLOCK_N]
        l = l * alpha + tl.sum(p, 1)
        if ROUND_P_BF16:
            p = _round_to_bf16(p)
        acc = acc * alpha[:, None] + tl.dot(p, k_latent, input_precision="ieee")  # [BLOCK_M, BLOCK_DV]
        m = m_new

    has_key = l > 0.0
    l_safe = tl.where(has_key, l, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)  # [BLOCK_M, BLOCK_DV]
    lse = tl.where(has_key, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    out_row_ptr = out_part_ptr + batch_index * stride_ob + split * stride_os + row * stride_or  # [BLOCK_M]
    tl.store(out_row_ptr[:, None] + dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse_part_ptr + batch_index * stride_lb + split * stride_ls + row, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    rows, head_dim_v, num_splits,
    stride_pb, stride_ps, stride_pr,          # out_part [batch, splits, rows, head_dim_v]
    stride_qb, stride_qs,                     # lse_part [batch, splits, rows]
    stride_ob, stride_or,                     # out [batch, rows, head_dim_v]
    stride_lb,                                # lse [batch, rows]
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s; empty splits (-inf) weigh 0."""
    batch_index = tl.program_id(0)
    row = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = row < rows
    split = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < head_dim_v

    part_lse = tl.load(lse_part_ptr + batch_index * stride_qb + split[None, :] * stride_qs + row[:, None],
                       mask=row_ok[:, None] & (split[None, :] < num_splits), other=float("-inf"))  # [BLOCK_M, BLOCK_S]
    top = tl.max(part_lse, 1)
    base = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: keep exp() away from -inf - -inf
    weight = tl.exp(part_lse - base[:, None])  # [BLOCK_M, BLOCK_S]
    total = tl.sum(weight, 1)
    has_key = total > 0.0
    weight = weight / tl.where(has_key, total, 1.0)[:, None]
    lse = tl.where(has_key, base + tl.log(tl.where(has_key, total, 1.0)), float("-inf"))

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s in range(0, num_splits):
        split_weight = tl.sum(tl.where(split[None, :] == s, weight, 0.0), 1)  # [BLOCK_M], column s
        used = row_ok & (split_weight > 0.0)  # an empty split's partial output is not read at all
        part = tl.load(out_part_ptr + batch_index * stride_pb + s * stride_ps + row[:, None] * stride_pr + dv[None, :],
                       mask=used[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
        acc += split_weight[:, None] * part
    tl.store(out_ptr + batch_index * stride_ob + row[:, None] * stride_or + dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + batch_index * stride_lb + row, lse, mask=row_ok)


def mla_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float, causal: bool, splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on tensors already validated and on one device: ``out`` (q's dtype) and fp32 ``lse``.

    ``q [batch, s_q, heads, width]``, ``k_cache [num_blocks, block_size, 1, width]`` (unit last
    strides), ``block_table [batch, max_blocks]`` and ``cache_seqlens [batch]`` int32.
    """
    batch, s_q, heads, width = q.shape
    rows = s_q * heads
    rope_dim = width - head_dim_v
    out_part = torch.empty((batch, splits, rows, head_dim_v), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, splits, rows), dtype=torch.float32, device=q.device)
    grid = (batch, triton.cdiv(rows, BLOCK_M), splits)
    _latent_attention_split_kernel[grid](
        q, k_cache, block_table, cache_seqlens, out_part, lse_part,
        float(softmax_scale) / LN2,
        s_q, heads, rows, head_dim_v, rope_dim, k_cache.shape[1], splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1),
        block_table.stride(0),
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        CAUSAL=bool(causal), ROUND_P_BF16=q.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), BLOCK_DR=max(16, triton.next_power_of_2(rope_dim)),
    )
    if splits == 1:
        out, lse = out_part[:, 0], lse_part[:, 0]  # [batch, rows, head_dim_v], [batch, rows]
    else:
        out = torch.empty((batch, rows, head_dim_v), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, rows), dtype=torch.float32, device=q.device)
        _merge_splits_kernel[(batch, triton.cdiv(rows, BLOCK_M))](
            out_part, lse_part, out, lse,
            rows, head_dim_v, splits,
            out_part.stride(0), out_part.stride(1), out_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), BLOCK_S=triton.next_power_of_2(splits),
        )
    out = out.reshape(batch, s_q, heads, head_dim_v).to(q.dtype)  # [batch, s_q, heads, head_dim_v]
    lse = lse.reshape(batch, s_q, heads).transpose(1, 2)  # [batch, heads, s_q]
    return out, lse


# ---------------------------------------------------------------------------- adapter

def _float_array(name: str, value, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {array.dtype} (MLA.17)")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(array.shape)} (MLA.17)")
    return array


def _int_array(name: str, value, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {array.dtype} (MLA.19)")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(array.shape)} (MLA.19)")
    return array.astype(np.int64)


def validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """Check the arguments of MLA.17 and return them as NumPy arrays; errors name the tensor, what came and what was expected."""
    q = _float_array("q", q, 4)
    batch, s_q, heads, width = q.shape
    if min(batch, s_q, heads) < 1:
        raise ValueError(f"q: expected [batch, s_q, heads, width] with batch, s_q, heads >= 1, got {list(q.shape)} (MLA.17)")
    if not np.all(np.isfinite(q)):
        raise ValueError(f"q: expected finite values, found {int(np.sum(~np.isfinite(q)))} NaN/inf (MLA.17)")
    if np.asarray(k_cache).dtype == np.uint8:
        raise Unsupported("FlashMLA's FP8 cache (uint8 records, spec/fp8.yaml FP8.12): this kernel reads float rows only")
    k_cache = _float_array("k_cache", k_cache, 4)
    if k_cache.shape[2] != 1 or k_cache.shape[3] != width or min(k_cache.shape[:2]) < 1:
        raise ValueError(f"k_cache: expected [num_blocks, block_size, 1, {width}] (one latent head, q's width), "
                         f"got {list(k_cache.shape)} (MLA.17)")
    num_blocks, block_size = k_cache.shape[:2]
    block_table = _int_array("block_table", block_table, 2)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected [{batch}, max_blocks] (q's batch), got {list(block_table.shape)} (MLA.19)")
    outside = (block_table < -1) | (block_table >= num_blocks)
    if outside.any():
        b, i = np.argwhere(outside)[0]
        raise ValueError(f"block_table: entries must lie in [-1, {num_blocks}) (k_cache has {num_blocks} blocks), "
                         f"got {int(block_table[b, i])} at [{b}, {i}] (MLA.19)")
    cache_seqlens = _int_array("cache_seqlens", cache_seqlens, 1)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens: expected [{batch}] (q's batch), got {list(cache_seqlens.shape)} (MLA.17)")
    capacity = block_table.shape[1] * block_size
    for b, seqlen in enumerate(cache_seqlens.tolist()):
        if not 0 <= seqlen <= capacity:
            raise ValueError(f"cache_seqlens: expected 0 .. {capacity} (max_blocks * block_size) per sequence, "
                             f"got {seqlen} for sequence {b} (MLA.19)")
        needed = block_table[b, : -(-seqlen // block_size)]
        if (needed < 0).any():
            raise ValueError(f"block_table: sequence {b} holds {seqlen} keys but logical block "
                             f"{int(np.flatnonzero(needed < 0)[0])} is unallocated (-1) (MLA.19)")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, (int, np.integer)) or not 0 < head_dim_v < width:
        raise ValueError(f"head_dim_v: expected an int in 1 .. {width - 1} (values are the first columns; the rope "
                         f"columns follow), got {head_dim_v!r} (MLA.17)")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (float, int, np.floating, np.integer)) \
            or not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a finite float > 0 (the model's scale), got {softmax_scale!r} (MLA.17)")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {causal!r} (MLA.17)")
    return q, k_cache, block_table, cache_seqlens


def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """MLA.17 — FlashMLA-layout latent attention through the Triton kernel, in the configured dtype and splits."""
    q, k_cache, block_table, cache_seqlens = validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    dtype, device = getattr(torch, DTYPE), DEVICE
    out, lse = mla_decode(torch.from_numpy(q).to(device=device, dtype=dtype).contiguous(),
                          torch.from_numpy(k_cache).to(device=device, dtype=dtype).contiguous(),
                          torch.from_numpy(block_table).to(device=device, dtype=torch.int32),
                          torch.from_numpy(cache_seqlens).to(device=device, dtype=torch.int32),
                          int(head_dim_v), float(softmax_scale), bool(causal), SPLITS)
    return {"out": out.float().cpu().double().numpy(), "lse": lse.cpu().double().numpy()}
