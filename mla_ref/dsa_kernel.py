"""DSA kernel contract — FlashMLA's sparse MLA kernels, steps DSA.13 and DSA.14 of spec/dsa.yaml.

Each query attends to its own list of ``topk`` latent rows named by integer indices,
instead of to every cached key. Both kernels are the layer's DSA.11 -> DSA.12
(:func:`mla_ref.dsa.sparse_attention`) over rows that live elsewhere, with another rule
for which index is invalid:

* :func:`sparse_decode_core` (DSA.13, ``flash_mla_with_kvcache`` with ``indices``): a paged cache
  ``[num_blocks, block_size, 1, width]``; an index is ``page * block_size + offset``; -1 is
  the only invalid index.
* :func:`sparse_prefill_core` (DSA.14, ``flash_mla_sparse_fwd``): one KV ``[s_kv, 1, width]``; any
  index < 0 or >= s_kv is invalid.

A query whose every index is invalid gets out 0 and lse +inf (FlashMLA's convention, unlike
MLA.17's -inf). The softmax scale is always passed: FlashMLA's default 576^-0.5 is wrong
for DeepSeek. LSE is the natural logarithm (FlashMLA's first sparse release used base 2).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from .checks import check_tensor, compute_dtype, finite_output
from .dsa import sparse_attention
from .errors import InputError, ShapeError, shown
from .fp8_cache import check_latent_records, decode_latent_record
from .trace import Trace, emit


def _check_indices(indices, shape: tuple, spec_id: str) -> np.ndarray:
    """An integer array of the given rank and fixed dims (ints in ``shape``), as int64."""
    array = np.asarray(indices)
    written = "[" + ", ".join(str(dim) for dim in shape) + "]"
    if array.dtype.kind not in "iu":
        raise ShapeError("indices", f"expected an integer array {written} (int32 in FlashMLA), got dtype {array.dtype}", spec_id)
    if array.ndim != len(shape) or any(isinstance(dim, int) and dim != size for dim, size in zip(shape, array.shape)):
        raise ShapeError("indices", f"expected {written}, got {tuple(array.shape)}", spec_id)
    return array.astype(np.int64)


def _check_scale_and_width(softmax_scale, head_dim_v, width: int, spec_id: str) -> None:
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, (int, np.integer)) or not 0 < head_dim_v <= width:
        raise InputError("head_dim_v", f"expected an int in 1 .. {width}, got {shown(head_dim_v)}", spec_id)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (float, int, np.floating, np.integer))
            or not (math.isfinite(softmax_scale) and softmax_scale > 0)):
        raise InputError("softmax_scale", "expected a finite float > 0 (the model's scale, e.g. 0.1352337788608801 for V3.2; "
                         f"never FlashMLA's default 576^-0.5), got {shown(softmax_scale)}", spec_id)


def _check_read_rows(name: str, flat_rows: np.ndarray, indices: np.ndarray, spec_id: str) -> None:
    """Every row a valid index (>= 0) reads must be finite; rows no index reads may hold anything (NaN in unused pages)."""
    read = np.unique(indices[indices >= 0])
    bad = read[~np.isfinite(flat_rows[read]).all(axis=-1)]
    if bad.size:
        where = [int(i) for i in np.argwhere(indices == bad[0])[0]]
        raise InputError(name, f"row {int(bad[0])} read by indices{where} is not finite; pass allow_nonfinite=True to accept NaN/Inf", spec_id)


def _decode_read_records(records: np.ndarray, indices: np.ndarray, head_dim_v: int, width: int, dtype) -> np.ndarray:
    """FP8.11 on the records some valid index reads, ``[slots, record_width]`` -> rows ``[slots, width]``; the rest stay 0
    (unused slots may hold any bytes, NaN codes included)."""
    rows = np.zeros((records.shape[0], width), dtype)
    read = np.unique(indices[indices >= 0])
    rows[read] = decode_latent_record(records[read], head_dim_v, width - head_dim_v)
    return rows


def _flashmla_lse(lse: np.ndarray) -> np.ndarray:
    """FlashMLA's convention for a query with nothing to attend: lse +inf (DSA.12 and MLA.10 give -inf)."""
    return np.where(np.isneginf(lse), np.inf, lse)


def sparse_decode_core(q: np.ndarray, k_cache: np.ndarray, indices: np.ndarray, head_dim_v: int, softmax_scale: float, *,
                       dtype: npt.DTypeLike = np.float64, allow_nonfinite: bool = False,
                       trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DSA.13 — FlashMLA sparse decode (``flash_mla_with_kvcache`` with ``indices``) over a paged latent cache.

    ``q [batch, s_q, heads, width]`` (``[q_absorbed | q_pe]``, width = kv_lora_rank + qk_rope_head_dim = 576 for V3.2),
    ``k_cache [num_blocks, block_size, 1, width]``, ``indices [batch, s_q, topk]``: entry ``page * block_size + offset``
    names row ``k_cache[page, offset, 0]`` (no block table); -1 is invalid. Returns ``out [batch, s_q, heads, head_dim_v]``
    and the natural-log ``lse [batch, heads, s_q]`` (+inf and out 0 for a query with no valid index). A uint8
    ``k_cache [num_blocks, block_size, 1, record_width]`` is FlashMLA's FP8 cache (FP8.12, 656-byte records for V3.2):
    the records the indices read are decoded (FP8.11) to the rows the attention reads.
    """
    dtype = compute_dtype(dtype, "DSA.13")
    q = check_tensor("q", q, ("batch", "s_q", "heads", "width"), "DSA.13", dtype, allow_nonfinite)
    batch, s_q, heads, width = q.shape
    _check_scale_and_width(softmax_scale, head_dim_v, width, "DSA.13")
    records = np.asarray(k_cache).dtype == np.uint8  # FP8.12: the latent is the first head_dim_v columns
    if records:
        cache = check_latent_records("k_cache", k_cache, head_dim_v, width - head_dim_v, "FP8.12", rank_name="head_dim_v")
    else:
        cache = check_tensor("k_cache", k_cache, ("num_blocks", "block_size", 1, width), "DSA.13", dtype, allow_nonfinite=True)
    slots = cache.shape[0] * cache.shape[1]
    index = _check_indices(indices, (batch, s_q, "topk"), "DSA.13")
    out_of_range = (index < -1) | (index >= slots)
    if out_of_range.any():
        where = tuple(int(i) for i in np.argwhere(out_of_range)[0])
        raise InputError("indices", f"expected -1 (invalid) or page * block_size + offset in 0 .. {slots - 1} "
                         f"({cache.shape[0]} pages of {cache.shape[1]}), got {int(index[where])} at {list(where)}", "DSA.13")
    q = q if trace is None else trace.round_input(q)
    cache = cache if trace is None else trace.round_input(cache)
    flat = cache.reshape(slots, cache.shape[-1])  # row (or record) page * block_size + offset
    if records:
        flat = emit(trace, "FP8.11", _decode_read_records(flat, index, int(head_dim_v), width, dtype))  # [slots, width]
    if not allow_nonfinite:
        _check_read_rows("k_cache", flat, index, "DSA.13")
    key_rows = np.broadcast_to(flat, (batch, slots, width))  # every sequence indexes the whole pool
    out, lse = sparse_attention(q, key_rows, index, float(softmax_scale), int(head_dim_v), trace=trace)  # DSA.11, DSA.12
    out = out if allow_nonfinite else finite_output("out", out, "DSA.13")
    return emit(trace, "DSA.13", out, _flashmla_lse(lse))


def sparse_prefill_core(q: np.ndarray, kv: np.ndarray, indices: np.ndarray, softmax_scale: float, head_dim_v: int, *,
                        dtype: npt.DTypeLike = np.float64, allow_nonfinite: bool = False,
                        trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DSA.14 — FlashMLA sparse prefill (``flash_mla_sparse_fwd``) on one KV of latent rows.

    ``q [s_q, heads, width]``, ``kv [s_kv, 1, width]``, ``indices [s_q, 1, topk]``: entry i names row ``kv[i, 0]``; any
    index < 0 or >= s_kv is invalid. No batch dimension (batches are flattened and their indices offset). Returns
    ``out [s_q, heads, head_dim_v]`` and the natural-log ``lse [s_q, heads]`` (+inf and out 0 with no valid index).
    FlashMLA also returns max_logits; this contract does not include it.
    """
    dtype = compute_dtype(dtype, "DSA.14")
    q = check_tensor("q", q, ("s_q", "heads", "width"), "DSA.14", dtype, allow_nonfinite)
    s_q, heads, width = q.shape
    rows = check_tensor("kv", kv, ("s_kv", 1, width), "DSA.14", dtype, allow_nonfinite=True)
    index = _check_indices(indices, (s_q, 1, "topk"), "DSA.14")[:, 0]  # [s_q, topk]
    _check_scale_and_width(softmax_scale, head_dim_v, width, "DSA.14")
    q = q if trace is None else trace.round_input(q)
    rows = rows if trace is None else trace.round_input(rows)
    index = np.where((index >= 0) & (index < rows.shape[0]), index, -1)  # every invalid index becomes DSA.11's -1
    if not allow_nonfinite:
        _check_read_rows("kv", rows[:, 0], index, "DSA.14")
    out, lse = sparse_attention(q[None], rows[None, :, 0], index[None], float(softmax_scale), int(head_dim_v), trace=trace)
    out = out[0] if allow_nonfinite else finite_output("out", out[0], "DSA.14")  # [s_q, heads, head_dim_v]
    return emit(trace, "DSA.14", out, _flashmla_lse(lse[0].T))  # lse [s_q, heads]
