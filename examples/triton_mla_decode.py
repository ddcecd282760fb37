"""Triton kernels for the absorbed MLA decode core (MLA.17) and FlashMLA's sparse kernels (DSA.13, DSA.14), behind the adapter protocol.

Dense decode (spec/mla.yaml MLA.19 -> MLA.8 -> MLA.14 -> MLA.10 -> MLA.15):

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

Sparse decode and prefill (spec/dsa.yaml DSA.13, DSA.14; FlashMLA's ``flash_mla_with_kvcache`` with
``indices`` and ``flash_mla_sparse_fwd``):

    q        [batch, s_q, heads, width]            (prefill: [s_q, heads, width])
    k_cache  [num_blocks, block_size, 1, width]    (prefill: kv [s_kv, 1, width], one page of s_kv rows)
    indices  [batch, s_q, topk]                    index = page * block_size + offset; -1 = padding
                                                   (prefill: [s_q, 1, topk]; any index < 0 or >= s_kv is invalid)
    out      [batch, s_q, heads, head_dim_v]       0 for a query with no valid index
    lse      [batch, heads, s_q]                   natural log; +inf for a query with no valid index (FlashMLA)

One program per (query, block of heads, split of the index list): every head of a query reads
the same ``topk`` rows, so the kernel loads a tile of BLOCK_N indices, decodes each to its page
and offset, gathers those rows (invalid entries are masked, never loaded) and runs the same
online softmax as the dense kernel. The kernel's one validity rule, ``0 <= index < slots``, is
DSA.14's; for DSA.13 the adapter refuses any index outside -1 .. slots - 1 first, so there it
means "-1 is padding". The softmax scale is always the caller's (FlashMLA's default 576^-0.5 is
wrong for DeepSeek). Split-KV splits the index list and reuses the merge kernel: a partial of an
empty split keeps lse -inf (weight 0); only the final lse of a query with no valid index is +inf.

FP8 cache (spec/fp8.yaml FP8.11, FP8.12): a uint8 ``k_cache [num_blocks, block_size, 1, record]``
holds FlashMLA's records (656 bytes for V3.2: head_dim_v e4m3 codes, one float32 scale per 128
codes, the rope part in bf16). Both kernels take the bytes as FlashMLA does and decode the
records they read inside the kernel (``_load_latent_rows``), so the byte layout is the kernel's
to get right and the checker's FP8 diagnoses apply to it: ``code * scale`` in fp32, or in bf16
mode ``bf16(bf16(code) * bf16(scale))`` (FlashMLA's bf16 multiply). Triton's interpreter decodes
the NaN codes 0x7F / 0xFF as +-480; no record the kernel reads holds them (unused slots may, and
are never loaded). On a GPU, ``tl.float8e4nv`` needs compute capability 8.9 or later.

Precision: operands are loaded in the input dtype and upcast to fp32; both products run as fp32
``tl.dot`` with ``input_precision="ieee"`` (no TF32). With bfloat16 inputs the probabilities are
rounded to bf16 before P.V, as FlashMLA does, and ``out`` is returned in bf16; logits, the
softmax statistics, partial outputs and the LSE stay fp32. The bf16 rounding of P is integer
bit arithmetic (round to nearest, ties to even): Triton 3.7's interpreter converts fp32 -> bf16
by truncation and computes garbage for bf16 arithmetic, so the kernel never relies on either.

Settings the protocol's arguments do not carry are module settings: ``configure(dtype, splits)``,
or at import ``MLA_REF_TRITON_DTYPE`` (float32 | bfloat16, default float32) and
``MLA_REF_TRITON_SPLITS`` (programs per sequence over the keys, or per query over its index list;
default 1 = no split).
``PROFILE`` names the matching precision profile. Without a GPU, set ``TRITON_INTERPRET=1``
before triton is imported (this module sets it when CUDA is absent and the variable is unset):

    TRITON_INTERPRET=1 mla-ref check examples/triton_mla_decode.py --select mla.core
    TRITON_INTERPRET=1 MLA_REF_TRITON_DTYPE=bfloat16 MLA_REF_TRITON_SPLITS=3 \\
        mla-ref check examples/triton_mla_decode.py --profile bf16 --select mla.core
    TRITON_INTERPRET=1 mla-ref check examples/triton_mla_decode.py --select dsa.core
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


PROFILES = {"float32": "fp32", "bfloat16": "bf16"}
DTYPE, SPLITS, PROFILE = "float32", 1, "fp32"
BLOCK_M = 16  # query rows per program (dense: heads x draft tokens; sparse: heads of one query); tl.dot's smallest tile
BLOCK_N = 16  # keys per tile (sparse: entries of the index list)
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
def _load_latent_rows(row_ptr, held, dv, dr, head_dim_v, rope_dim,
                      FP8_RECORDS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The cache rows at ``row_ptr [BLOCK_N]`` where ``held``, in fp32: the latent ``[BLOCK_N, BLOCK_DV]`` (the values
    too) and the rope part ``[BLOCK_N, BLOCK_DR]``; 0 where not held (nothing is loaded there).

    FP8_RECORDS: each row is FlashMLA's FP8 record, decoded here (FP8.11): e4m3 codes at bytes ``0 .. head_dim_v``,
    ``head_dim_v / 128`` float32 scales after them, then ``rope_dim`` bf16 values."""
    latent_mask = held[:, None] & (dv < head_dim_v)[None, :]
    rope_mask = held[:, None] & (dr < rope_dim)[None, :]
    if FP8_RECORDS:
        codes = tl.load(row_ptr[:, None] + dv[None, :], mask=latent_mask, other=0)  # [BLOCK_N, BLOCK_DV] uint8
        latent = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # e4m3fn (OCP), exact in fp32
        scale_ptr = (row_ptr + head_dim_v).to(tl.pointer_type(tl.float32))  # [BLOCK_N], the record's scales
        scale = tl.load(scale_ptr[:, None] + dv[None, :] // 128, mask=latent_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DV]
        if ROUND_BF16:
            latent = _round_to_bf16(latent * _round_to_bf16(scale))  # FlashMLA: bf16(code) * bf16(scale) in bf16
        else:
            latent = latent * scale
        rope_ptr = (row_ptr + head_dim_v + 4 * (head_dim_v // 128)).to(tl.pointer_type(tl.bfloat16))  # [BLOCK_N]
        rope = tl.load(rope_ptr[:, None] + dr[None, :], mask=rope_mask, other=0.0).to(tl.float32)
    else:
        latent = tl.load(row_ptr[:, None] + dv[None, :], mask=latent_mask, other=0.0).to(tl.float32)
        rope = tl.load(row_ptr[:, None] + head_dim_v + dr[None, :], mask=rope_mask, other=0.0).to(tl.float32)
    return latent, rope


@triton.jit
def _online_softmax_tile(m, l, acc, q_latent, q_rope, k_latent, k_rope, visible, scale_log2, ROUND_BF16: tl.constexpr):
    """MLA.14 -> MLA.10 -> MLA.15 on one tile of keys, folded into the running max ``m`` of the base-2 logits, the running
    sum ``l`` of exp2(logit - m) ``[BLOCK_M]`` and the unnormalised output ``acc [BLOCK_M, BLOCK_DV]``; ``visible
    [BLOCK_M, BLOCK_N]`` says which (row, key) pairs count."""
    logits = tl.dot(q_latent, tl.trans(k_latent), input_precision="ieee")
    logits += tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
    logits = tl.where(visible, logits * scale_log2, float("-inf"))

    m_new = tl.maximum(m, tl.max(logits, 1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
    alpha = tl.exp2(m - m_base)  # [BLOCK_M] rescales what was summed under the old max
    p = tl.exp2(logits - m_base[:, None])  # [BLOCK_M, BLOCK_N]
    l = l * alpha + tl.sum(p, 1)
    if ROUND_BF16:
        p = _round_to_bf16(p)
    acc = acc * alpha[:, None] + tl.dot(p, k_latent, input_precision="ieee")  # [BLOCK_M, BLOCK_DV]
    return m_new, l, acc


@triton.jit
def _normalised_output(m, l, acc, empty_lse):
    """``out = acc / l [BLOCK_M, BLOCK_DV]`` and the natural-log ``lse [BLOCK_M]``; a row with no key: out 0, lse empty_lse."""
    has_key = l > 0.0
    l_safe = tl.where(has_key, l, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, (m + tl.log2(l_safe)) * 0.6931471805599453, empty_lse)  # base-2 units to natural log
    return out, lse


@triton.jit
def _latent_attention_split_kernel(
    q_ptr, cache_ptr, table_ptr, seqlens_ptr, out_part_ptr, lse_part_ptr,
    scale_log2,                               # softmax_scale * log2(e)
    s_q, heads, rows, head_dim_v, rope_dim, block_size, num_splits,
    stride_qb, stride_qs, stride_qh,          # q [batch, s_q, heads, width], unit last stride
    stride_cb, stride_cs,                     # k_cache [num_blocks, block_size, 1, width or record], unit last stride
    stride_tb,                                # block_table [batch, max_blocks]
    stride_ob, stride_os, stride_or,          # out_part [batch, splits, rows, head_dim_v]
    stride_lb, stride_ls,                     # lse_part [batch, splits, rows]
    CAUSAL: tl.constexpr, FP8_RECORDS: tl.constexpr, ROUND_BF16: tl.constexpr,
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
        k_latent, k_rope = _load_latent_rows(slot_ptr, held, dv, dr, head_dim_v, rope_dim, FP8_RECORDS, ROUND_BF16)
        visible = held[None, :] & (key[None, :] <= last_visible[:, None])  # [BLOCK_M, BLOCK_N]
        m, l, acc = _online_softmax_tile(m, l, acc, q_latent, q_rope, k_latent, k_rope, visible, scale_log2, ROUND_BF16)

    out, lse = _normalised_output(m, l, acc, float("-inf"))  # [BLOCK_M, BLOCK_DV], [BLOCK_M]
    out_row_ptr = out_part_ptr + batch_index * stride_ob + split * stride_os + row * stride_or  # [BLOCK_M]
    tl.store(out_row_ptr[:, None] + dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse_part_ptr + batch_index * stride_lb + split * stride_ls + row, lse, mask=row_ok)


@triton.jit
def _sparse_attention_split_kernel(
    q_ptr, cache_ptr, indices_ptr, out_part_ptr, lse_part_ptr,
    scale_log2,                               # softmax_scale * log2(e)
    empty_lse,                                # lse of a row with no valid index in this split
    heads, topk, head_dim_v, rope_dim, block_size, slots, num_splits,
    stride_qn, stride_qh,                     # q [queries, heads, width], unit last stride; queries = batch * s_q
    stride_cb, stride_cs,                     # k_cache [num_blocks, block_size, 1, width or record], unit last stride
    stride_in,                                # indices [queries, topk], unit last stride
    stride_on, stride_os, stride_oh,          # out_part [queries, splits, heads, head_dim_v]
    stride_ln, stride_ls,                     # lse_part [queries, splits, heads]
    FP8_RECORDS: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    """DSA.13 / DSA.14 — one (query, head block, split of the index list): gather the rows the indices name, online softmax."""
    query = tl.program_id(0)
    split = tl.program_id(2)
    head = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]; every head reads the query's rows
    head_ok = head < heads
    dv = tl.arange(0, BLOCK_DV)  # value / latent columns
    dr = tl.arange(0, BLOCK_DR)  # rope columns, after the latent ones
    q_row_ptr = q_ptr + query * stride_qn + head * stride_qh  # [BLOCK_M]
    q_latent = tl.load(q_row_ptr[:, None] + dv[None, :], mask=head_ok[:, None] & (dv < head_dim_v)[None, :], other=0.0)
    q_latent = q_latent.to(tl.float32)  # [BLOCK_M, BLOCK_DV]
    q_rope = tl.load(q_row_ptr[:, None] + head_dim_v + dr[None, :], mask=head_ok[:, None] & (dr < rope_dim)[None, :], other=0.0)
    q_rope = q_rope.to(tl.float32)  # [BLOCK_M, BLOCK_DR]

    # This split's entries of the index list: a contiguous run of whole tiles, cut at topk.
    tiles_per_split = tl.cdiv(tl.cdiv(topk, BLOCK_N), num_splits)
    entry_start = split * tiles_per_split * BLOCK_N
    entry_end = tl.minimum(entry_start + tiles_per_split * BLOCK_N, topk)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - m)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # running sum of exp2(logit - m) * value
    for entry0 in range(entry_start, entry_end, BLOCK_N):
        entry = entry0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] places in the index list
        index = tl.load(indices_ptr + query * stride_in + entry, mask=entry < entry_end, other=-1)  # [BLOCK_N]
        valid = (index >= 0) & (index < slots)  # DSA.14's rule; DSA.13's indices are -1 or in range
        slot = tl.minimum(tl.maximum(index, 0), slots - 1)  # an address inside the pool; invalid entries are not loaded
        page = slot // block_size  # token encoding: index = page * block_size + offset (DSA.13)
        offset = slot % block_size
        row_ptr = cache_ptr + page.to(tl.int64) * stride_cb + offset * stride_cs  # [BLOCK_N]
        k_latent, k_rope = _load_latent_rows(row_ptr, valid, dv, dr, head_dim_v, rope_dim, FP8_RECORDS, ROUND_BF16)
        visible = valid[None, :]  # [1, BLOCK_N]: every head sees the query's valid rows
        m, l, acc = _online_softmax_tile(m, l, acc, q_latent, q_rope, k_latent, k_rope, visible, scale_log2, ROUND_BF16)

    out, lse = _normalised_output(m, l, acc, empty_lse)  # [BLOCK_M, BLOCK_DV], [BLOCK_M]
    out_row_ptr = out_part_ptr + query * stride_on + split * stride_os + head * stride_oh  # [BLOCK_M]
    tl.store(out_row_ptr[:, None] + dv[None, :], out, mask=head_ok[:, None] & (dv < head_dim_v)[None, :])
    tl.store(lse_part_ptr + query * stride_ln + split * stride_ls + head, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    out_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    empty_lse,                                # lse of a row with no key in any split (-inf for MLA.17, +inf for DSA.13)
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
    lse = tl.where(has_key, base + tl.log(tl.where(has_key, total, 1.0)), empty_lse)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s in range(0, num_splits):
        split_weight = tl.sum(tl.where(split[None, :] == s, weight, 0.0), 1)  # [BLOCK_M], column s
        used = row_ok & (split_weight > 0.0)  # an empty split's partial output is not read at all
        part = tl.load(out_part_ptr + batch_index * stride_pb + s * stride_ps + row[:, None] * stride_pr + dv[None, :],
                       mask=used[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
        acc += split_weight[:, None] * part
    tl.store(out_ptr + batch_index * stride_ob + row[:, None] * stride_or + dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + batch_index * stride_lb + row, lse, mask=row_ok)


def _merge_splits(out_part: torch.Tensor, lse_part: torch.Tensor, empty_lse: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The split kernels' partials ``out_part [n, splits, rows, head_dim_v]`` and ``lse_part [n, splits, rows]`` merged by
    LSE: ``out [n, rows, head_dim_v]`` and ``lse [n, rows]``, ``empty_lse`` where no split had a key."""
    n, splits, rows, head_dim_v = out_part.shape
    if splits == 1:
        return out_part[:, 0], lse_part[:, 0]
    out = torch.empty((n, rows, head_dim_v), dtype=torch.float32, device=out_part.device)
    lse = torch.empty((n, rows), dtype=torch.float32, device=out_part.device)
    _merge_splits_kernel[(n, triton.cdiv(rows, BLOCK_M))](
        out_part, lse_part, out, lse,
        empty_lse,
        rows, head_dim_v, splits,
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), BLOCK_S=triton.next_power_of_2(splits),
    )
    return out, lse


def mla_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float, causal: bool, splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA.17 on tensors already validated and on one device: ``out`` (q's dtype) and fp32 ``lse``.

    ``q [batch, s_q, heads, width]``, ``k_cache [num_blocks, block_size, 1, width]`` in q's dtype or uint8 FP8 records
    ``[num_blocks, block_size, 1, record]`` (unit last strides), ``block_table [batch, max_blocks]`` and
    ``cache_seqlens [batch]`` int32.
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
        CAUSAL=bool(causal), FP8_RECORDS=k_cache.dtype == torch.uint8, ROUND_BF16=q.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), BLOCK_DR=max(16, triton.next_power_of_2(rope_dim)),
    )
    out, lse = _merge_splits(out_part, lse_part, float("-inf"))  # [batch, rows, head_dim_v], [batch, rows]
    out = out.reshape(batch, s_q, heads, head_dim_v).to(q.dtype)  # [batch, s_q, heads, head_dim_v]
    lse = lse.reshape(batch, s_q, heads).transpose(1, 2)  # [batch, heads, s_q]
    return out, lse


def sparse_mla(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor, head_dim_v: int, softmax_scale: float,
               splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """DSA.13 / DSA.14 on tensors already validated and on one device: ``out`` (q's dtype) and fp32 ``lse``.

    ``q [queries, heads, width]`` (queries = batch * s_q), ``k_cache [num_blocks, block_size, 1, width]`` in q's dtype
    or uint8 FP8 records ``[num_blocks, block_size, 1, record]`` (unit last strides), ``indices [queries, topk]`` int32
    in the token encoding, an entry outside 0 .. num_blocks * block_size - 1 invalid. Returns ``out [queries, heads,
    head_dim_v]`` and ``lse [queries, heads]``: out 0 and lse +inf for a query with no valid index (FlashMLA).
    """
    queries, heads, width = q.shape
    num_blocks, block_size = k_cache.shape[:2]
    rope_dim = width - head_dim_v
    scale_log2 = float(softmax_scale) / LN2  # logits in base-2 units: exp2(x * scale / ln 2) = exp(x * scale)
    empty_lse = float("inf")  # FlashMLA's lse for a query with no valid index
    out_part = torch.empty((queries, splits, heads, head_dim_v), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((queries, splits, heads), dtype=torch.float32, device=q.device)
    _sparse_attention_split_kernel[(queries, triton.cdiv(heads, BLOCK_M), splits)](
        q, k_cache, indices, out_part, lse_part,
        scale_log2,
        empty_lse if splits == 1 else float("-inf"),  # a partial the merge reads: an empty split's -inf weighs 0
        heads, indices.shape[1], head_dim_v, rope_dim, block_size, num_blocks * block_size, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        indices.stride(0),
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        FP8_RECORDS=k_cache.dtype == torch.uint8, ROUND_BF16=q.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), BLOCK_DR=max(16, triton.next_power_of_2(rope_dim)),
    )
    out, lse = _merge_splits(out_part, lse_part, empty_lse)  # [queries, heads, head_dim_v], [queries, heads]
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------- adapter

def _float_array(name: str, value, ndim: int, spec_id: str = "MLA.17") -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {array.dtype} ({spec_id})")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(array.shape)} ({spec_id})")
    return array


def _int_array(name: str, value, ndim: int, spec_id: str = "MLA.19") -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {array.dtype} ({spec_id})")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(array.shape)} ({spec_id})")
    return array.astype(np.int64)


def _query(q, ndim: int, spec_id: str) -> np.ndarray:
    """q with every dimension but the width >= 1 and finite values."""
    q = _float_array("q", q, ndim, spec_id)
    if min(q.shape[:-1]) < 1:
        raise ValueError(f"q: expected every dimension but the width >= 1, got {list(q.shape)} ({spec_id})")
    if not np.all(np.isfinite(q)):
        raise ValueError(f"q: expected finite values, found {int(np.sum(~np.isfinite(q)))} NaN/inf ({spec_id})")
    return q


def _check_scalars(head_dim_v, softmax_scale, width: int, spec_id: str) -> None:
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, (int, np.integer)) or not 0 < head_dim_v < width:
        raise ValueError(f"head_dim_v: expected an int in 1 .. {width - 1} (values are the first columns; the rope "
                         f"columns follow), got {head_dim_v!r} ({spec_id})")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (float, int, np.floating, np.integer)) \
            or not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a finite float > 0 (the model's scale), got {softmax_scale!r} ({spec_id})")


def _paged_cache(k_cache, width: int, head_dim_v: int, spec_id: str) -> np.ndarray:
    """``[num_blocks, block_size, 1, width]`` float rows, or uint8 FP8 records ``[num_blocks, block_size, 1, record]``
    (FP8.12: record = head_dim_v + 4 * head_dim_v / 128 + 2 * (width - head_dim_v), 656 for V3.2)."""
    if np.asarray(k_cache).dtype == np.uint8:
        if head_dim_v % 128:
            raise ValueError(f"head_dim_v: FP8 records hold one scale per 128 latent values, got {head_dim_v} (FP8.12)")
        record = head_dim_v + 4 * (head_dim_v // 128) + 2 * (width - head_dim_v)
        k_cache = np.asarray(k_cache)
        if k_cache.ndim != 4 or k_cache.shape[2:] != (1, record) or min(k_cache.shape[:2]) < 1:
            raise ValueError(f"k_cache: expected uint8 records [num_blocks, block_size, 1, {record}], got {list(k_cache.shape)} (FP8.12)")
        return k_cache
    k_cache = _float_array("k_cache", k_cache, 4, spec_id)
    if k_cache.shape[2] != 1 or k_cache.shape[3] != width or min(k_cache.shape[:2]) < 1:
        raise ValueError(f"k_cache: expected [num_blocks, block_size, 1, {width}] (one latent head, q's width), "
                         f"got {list(k_cache.shape)} ({spec_id})")
    return k_cache


def validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """Check the arguments of MLA.17 and return them as NumPy arrays; errors name the tensor, what came and what was expected."""
    q = _query(q, 4, "MLA.17")
    batch, s_q, heads, width = q.shape
    _check_scalars(head_dim_v, softmax_scale, width, "MLA.17")
    k_cache = _paged_cache(k_cache, width, head_dim_v, "MLA.17")
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
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {causal!r} (MLA.17)")
    return q, k_cache, block_table, cache_seqlens


def validate_sparse_decode(q, k_cache, indices, head_dim_v, softmax_scale):
    """Check the arguments of DSA.13 and return them as NumPy arrays: an index outside -1 .. slots - 1 is refused."""
    q = _query(q, 4, "DSA.13")
    batch, s_q, heads, width = q.shape
    _check_scalars(head_dim_v, softmax_scale, width, "DSA.13")
    k_cache = _paged_cache(k_cache, width, head_dim_v, "DSA.13")
    slots = k_cache.shape[0] * k_cache.shape[1]
    indices = _int_array("indices", indices, 3, "DSA.13")
    if indices.shape[:2] != (batch, s_q):
        raise ValueError(f"indices: expected [{batch}, {s_q}, topk] (q's batch and s_q), got {list(indices.shape)} (DSA.13)")
    outside = (indices < -1) | (indices >= slots)
    if outside.any():
        where = [int(i) for i in np.argwhere(outside)[0]]
        raise ValueError(f"indices: expected -1 (padding) or page * block_size + offset in 0 .. {slots - 1}, "
                         f"got {int(indices[tuple(where)])} at {where} (DSA.13)")
    return q, k_cache, indices


def validate_sparse_prefill(q, kv, indices, softmax_scale, head_dim_v):
    """Check the arguments of DSA.14 and return them as NumPy arrays; any int32 index is accepted (outside the rows: invalid)."""
    q = _query(q, 3, "DSA.14")
    s_q, heads, width = q.shape
    _check_scalars(head_dim_v, softmax_scale, width, "DSA.14")
    kv = _float_array("kv", kv, 3, "DSA.14")
    if kv.shape[1:] != (1, width) or kv.shape[0] < 1:
        raise ValueError(f"kv: expected [s_kv, 1, {width}] (one latent head, q's width), got {list(kv.shape)} (DSA.14)")
    indices = _int_array("indices", indices, 3, "DSA.14")
    if indices.shape[:2] != (s_q, 1):
        raise ValueError(f"indices: expected [{s_q}, 1, topk] (q's s_q, one KV head), got {list(indices.shape)} (DSA.14)")
    info = np.iinfo(np.int32)
    outside = (indices < info.min) | (indices > info.max)
    if outside.any():
        where = [int(i) for i in np.argwhere(outside)[0]]
        raise ValueError(f"indices: expected int32 values (FlashMLA's indices), got {int(indices[tuple(where)])} at {where} (DSA.14)")
    return q, kv, indices


def _device(array: np.ndarray) -> torch.Tensor:
    """A float array in the configured dtype (FP8 records stay uint8 bytes), contiguous, on the kernel's device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    dtype = tensor.dtype if tensor.dtype == torch.uint8 else getattr(torch, DTYPE)
    return tensor.to(device=DEVICE, dtype=dtype).contiguous()


def _indices(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int32)).to(DEVICE)


def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """MLA.17 — FlashMLA-layout latent attention through the Triton kernel, in the configured dtype and splits."""
    q, k_cache, block_table, cache_seqlens = validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    out, lse = mla_decode(_device(q), _device(k_cache), _indices(block_table), _indices(cache_seqlens),
                          int(head_dim_v), float(softmax_scale), bool(causal), SPLITS)
    return {"out": out.float().cpu().double().numpy(), "lse": lse.cpu().double().numpy()}


def sparse_decode_core(q, k_cache, indices, head_dim_v, softmax_scale):
    """DSA.13 — FlashMLA sparse decode through the Triton kernel: each query attends to the rows its indices name."""
    q, k_cache, indices = validate_sparse_decode(q, k_cache, indices, head_dim_v, softmax_scale)
    batch, s_q, heads, _ = q.shape
    out, lse = sparse_mla(_device(q).flatten(0, 1), _device(k_cache), _indices(indices).flatten(0, 1),
                          int(head_dim_v), float(softmax_scale), SPLITS)  # [batch * s_q, heads, head_dim_v], [batch * s_q, heads]
    out = out.reshape(batch, s_q, heads, -1)  # [batch, s_q, heads, head_dim_v]
    lse = lse.reshape(batch, s_q, heads).transpose(1, 2)  # [batch, heads, s_q]
    return {"out": out.float().cpu().double().numpy(), "lse": lse.cpu().double().numpy()}


def sparse_prefill_core(q, kv, indices, softmax_scale, head_dim_v):
    """DSA.14 — FlashMLA sparse prefill through the same kernel, kv viewed as one page of s_kv rows: the kernel's rule
    (an index outside 0 .. s_kv - 1 is invalid) is DSA.14's."""
    q, kv, indices = validate_sparse_prefill(q, kv, indices, softmax_scale, head_dim_v)
    pool = kv[None]  # [1, s_kv, 1, width]: page 0, offset = index
    out, lse = sparse_mla(_device(q), _device(pool), _indices(indices[:, 0]), int(head_dim_v), float(softmax_scale), SPLITS)
    return {"out": out.float().cpu().double().numpy(), "lse": lse.cpu().double().numpy()}  # [s_q, heads, head_dim_v], [s_q, heads]
