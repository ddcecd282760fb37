"""The indexer's FP8 key cache — DSA.15-DSA.18 of spec/dsa.yaml (the float cache of DSA.7 as engines store it).

DeepSeek-V3.2 keeps the lightning indexer's keys in FP8: per token ``index_head_dim`` e4m3fn
codes and one float32 scale (132 bytes for index_head_dim 128). DeepGEMM, vLLM and SGLang page
them without interleaving the two: a page of ``block_size`` tokens holds every token's codes,
token-major, then every token's 4 scale bytes. The API views a page as
``[block_size, 1, index_head_dim + 4]``, so ``k_cache[page, offset, 0, :index_head_dim]`` is NOT
token ``offset``'s codes once ``offset > 0``. DeepGEMM's ``fp8_mqa_logits`` family scores queries
against such a cache, ``out = sum_h relu(q[h] . (k * s)) * weights[h]``, the query's FP8 scale
and the indexer's ``index_head_dim ** -0.5`` folded into ``weights`` by the caller.
Decoding is exact in float64 (a 4-bit e4m3 significand times a float32 scale).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .checks import check_tensor, compute_dtype
from .errors import InputError, ShapeError, shown
from .fp8 import AMAX_FLOOR, FORMATS, check_codes, decode_fp8, encode_fp8, ue8m0_scale
from .precision import matmul
from .trace import Trace, emit

SCALE_RULES = ("ue8m0", "plain")
SCALE_BYTES = 4  # one float32 per token, little-endian


def check_scale_rule(scale_rule, spec_id: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise InputError("scale_rule", f"expected one of {list(SCALE_RULES)}, got {shown(scale_rule)}", spec_id)


def index_key_scale(amax, scale_rule: str = "ue8m0") -> np.ndarray:
    """DSA.15 — a token's float32 key scale from its amax: ``max(amax, 1e-4) / 448``, ``ue8m0`` rounded up to a power of two.

    ``ue8m0``: DeepSeek-V3.2 (EXP act_quant with scale_fmt ue8m0) and vLLM's writer with ue8m0; ``plain``: DeepGEMM's
    tests (``amax.clamp(1e-4) / 448``) and vLLM's writer without it (VL indexer_k_quant_and_cache_kernel).
    """
    check_scale_rule(scale_rule, "DSA.15")
    single = np.asarray(amax, dtype=np.float32)
    if not (np.all(np.isfinite(single)) and np.all(single >= 0)):
        raise InputError("amax", "expected finite values >= 0", "DSA.15")
    scale = np.maximum(single, np.float32(AMAX_FLOOR)) / np.float32(FORMATS["e4m3fn"].max_finite)  # float32 division
    return ue8m0_scale(scale) if scale_rule == "ue8m0" else scale


def encode_index_keys(keys, scale_rule: str = "ue8m0") -> tuple[np.ndarray, np.ndarray]:
    """DSA.16 — keys ``[..., index_dim]`` to e4m3fn codes of ``clamp(float32(k) / s, -448, 448)`` and one float32 scale per token."""
    single = np.asarray(keys, dtype=np.float32)
    if single.ndim == 0 or single.shape[-1] == 0:
        raise ShapeError("keys", f"expected [..., index_head_dim], got {list(single.shape)}", "DSA.16")
    if not np.all(np.isfinite(single)):
        raise InputError("keys", "expected finite values", "DSA.16")
    scale = index_key_scale(np.abs(single).max(axis=-1), scale_rule)  # [...]
    max_finite = np.float32(FORMATS["e4m3fn"].max_finite)
    return encode_fp8(np.clip(single / scale[..., None], -max_finite, max_finite)), scale  # [..., index_dim] uint8, [...] float32


def check_index_key_pages(name: str, value, spec_id: str) -> np.ndarray:
    """A paged indexer key cache ``[num_blocks, block_size, 1, index_head_dim + 4]`` uint8 (DeepGEMM's ``kv_cache``)."""
    pages = check_codes(value, name, spec_id)
    if pages.ndim != 4 or pages.shape[2] != 1 or pages.shape[3] <= SCALE_BYTES or 0 in pages.shape:
        raise ShapeError(name, f"expected uint8 pages [num_blocks, block_size, 1, index_head_dim + {SCALE_BYTES}] (index_head_dim "
                         f"e4m3 codes per token, then one float32 scale per token), got {list(pages.shape)}", spec_id)
    return pages


def page_fields(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of a page's two fields: codes ``[num_blocks, block_size, index_dim]`` (bytes 0 .. block_size * index_dim, token-major)
    and scale bytes ``[num_blocks, block_size, 4]`` (the block_size * 4 bytes after them)."""
    num_blocks, block_size, _, width = pages.shape
    index_dim = width - SCALE_BYTES
    flat = pages.reshape(num_blocks, block_size * width)  # one page's bytes in a row
    codes = flat[:, : block_size * index_dim].reshape(num_blocks, block_size, index_dim)
    return codes, flat[:, block_size * index_dim:].reshape(num_blocks, block_size, SCALE_BYTES)


def write_index_key_pages(k_cache, keys, slot_mapping, scale_rule: str = "ue8m0") -> np.ndarray:
    """DSA.16 — write keys ``[tokens, index_dim]`` at slots ``page * block_size + offset`` (-1: skipped) of a copy of the pages.

    Every other byte of ``k_cache`` is kept (VL indexer_k_quant_and_cache_kernel; DG kv_cache_cast_to_fp8 layout).
    """
    pages = check_index_key_pages("k_cache", k_cache, "DSA.16").copy()
    num_blocks, block_size, _, width = pages.shape
    values = np.asarray(keys)
    if values.dtype.kind != "f" or values.ndim != 2 or values.shape[1] != width - SCALE_BYTES:
        raise ShapeError("keys", f"expected float keys [tokens, index_head_dim = {width - SCALE_BYTES}] (k_cache's width less "
                         f"{SCALE_BYTES} scale bytes), got {values.dtype} {list(values.shape)}", "DSA.16")
    slots = np.asarray(slot_mapping)
    if slots.dtype.kind not in "iu" or slots.shape != values.shape[:1]:
        raise ShapeError("slot_mapping", f"expected integers [tokens = {values.shape[0]}], got {slots.dtype} {list(slots.shape)}", "DSA.16")
    slots = slots.astype(np.int64)
    written = slots >= 0
    taken = slots[written]
    if (slots < -1).any() or (taken >= num_blocks * block_size).any() or np.unique(taken).size != taken.size:
        raise InputError("slot_mapping", f"expected distinct slots in 0 .. {num_blocks * block_size - 1} ({num_blocks} pages of "
                         f"{block_size}) or -1 (skipped), got {slots.tolist()}", "DSA.16")
    codes, scale = encode_index_keys(values[written], scale_rule)  # [written, index_dim], [written]
    code_field, scale_field = page_fields(pages)
    page, offset = taken // block_size, taken % block_size
    code_field[page, offset] = codes
    scale_field[page, offset] = scale.astype("<f4").view(np.uint8).reshape(-1, SCALE_BYTES)
    return pages  # [num_blocks, block_size, 1, index_dim + 4]


def index_scales(scale_bytes: np.ndarray) -> np.ndarray:
    """Slots' scale bytes ``[..., 4]`` as float64 scales ``[...]`` (one little-endian float32 each)."""
    return np.ascontiguousarray(scale_bytes).view("<f4")[..., 0].astype(np.float64)


def decode_index_keys(codes: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """DSA.17 — slots' codes ``[..., index_dim]`` and scale bytes ``[..., 4]`` to float64 keys: decode(code) * scale, exact."""
    return decode_fp8(codes) * index_scales(scale_bytes)[..., None]  # [..., index_dim]


def decode_index_key_pages(k_cache) -> np.ndarray:
    """DSA.17 — every slot of the pages as float64 keys ``[num_blocks, block_size, index_dim]``."""
    return decode_index_keys(*page_fields(check_index_key_pages("k_cache", k_cache, "DSA.17")))


def _check_paged_inputs(q, k_cache, logit_weights, context_lens, block_table) -> tuple[np.ndarray, ...]:
    """DSA.18's inputs checked: q codes ``[batch, next_n, heads, index_dim]``, pages, logit_weights ``[batch, next_n, heads]``,
    context lengths in next_n .. max_blocks * block_size, a block table whose pages exist where a query reads them."""
    pages = check_index_key_pages("k_cache", k_cache, "DSA.18")
    num_blocks, block_size, _, width = pages.shape
    codes = check_codes(q, "q", "DSA.18")
    if codes.ndim != 4 or codes.shape[-1] != width - SCALE_BYTES:
        raise ShapeError("q", f"expected e4m3 codes [batch, next_n, heads, index_head_dim = {width - SCALE_BYTES}], got {list(codes.shape)}",
                         "DSA.18")
    if np.isin(codes, FORMATS["e4m3fn"].nan_codes).any():
        raise InputError("q", "expected e4m3fn codes of finite values, got NaN codes (0x7F, 0xFF)", "DSA.18")
    batch, next_n, heads, _ = codes.shape
    logit_weights = check_tensor("logit_weights", logit_weights, (batch, next_n, heads), "DSA.18", np.float64)
    table = np.asarray(block_table)
    lengths = np.asarray(context_lens)
    if table.dtype.kind not in "iu" or table.ndim != 2 or table.shape[0] != batch:
        raise ShapeError("block_table", f"expected integers [batch = {batch}, max_blocks], got {table.dtype} {list(table.shape)}", "DSA.18")
    if lengths.dtype.kind not in "iu" or lengths.shape != (batch,):
        raise ShapeError("context_lens", f"expected integers [batch = {batch}], got {lengths.dtype} {list(lengths.shape)}", "DSA.18")
    table, lengths = table.astype(np.int64), lengths.astype(np.int64)
    capacity = table.shape[1] * block_size
    if ((lengths < next_n) | (lengths > capacity)).any():
        raise InputError("context_lens", f"expected values in next_n = {next_n} .. max_blocks * block_size = {capacity}, "
                         f"got {lengths.tolist()}", "DSA.18")
    used = np.arange(table.shape[1])[None, :] * block_size < lengths[:, None]  # [batch, max_blocks]: pages holding keys
    if ((table < 0) | (table >= num_blocks))[used].any():
        raise InputError("block_table", f"expected pages in 0 .. {num_blocks - 1} for every block below context_lens, got "
                         f"{table.tolist()}", "DSA.18")
    return codes, pages, logit_weights, lengths, np.where(used, table, -1)


def _check_read_slots(codes: np.ndarray, scale_bytes: np.ndarray, read: np.ndarray) -> None:
    """The slots a query reads (``read [batch, keys]``, their codes and scale bytes in its order) hold no NaN code (0x7F,
    0xFF) and a finite scale > 0; other slots may hold anything."""
    scale = index_scales(scale_bytes)  # [read slots]
    bad = np.isin(codes, FORMATS["e4m3fn"].nan_codes).any(axis=-1) | ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        where = [int(i) for i in np.argwhere(read)[np.flatnonzero(bad)[0]]]
        raise InputError("k_cache", f"the slot of [batch, position] = {where} holds a NaN code or a scale that is not finite "
                         "and > 0", "DSA.18")


def paged_index_logits(q, k_cache, logit_weights, context_lens, block_table, *, dtype: npt.DTypeLike = np.float64,
                       trace: Trace | None = None) -> np.ndarray:
    """DSA.18 — DeepGEMM ``fp8_paged_mqa_logits``: ``out[b, i, t] = sum_h relu(q[b, i, h] . k_hat[t]) * logit_weights[b, i, h]``.

    ``q [batch, next_n, heads, index_dim]`` uint8 e4m3 codes (the query's scale folded into ``logit_weights [batch, next_n, heads]``,
    DeepGEMM's ``weights``),
    ``k_cache`` DSA.17 pages, ``block_table [batch, max_blocks]`` (-1 or anything past the context: unread), ``context_lens [batch]``.
    Query i of sequence b sits at position ``context_lens[b] - next_n + i`` and sees keys t <= that position; every other
    logit is -inf. Returns ``logits [batch, next_n, max_blocks * block_size]``; bytes of slots no query sees are never read.
    """
    dtype = compute_dtype(dtype, "DSA.18")
    codes, pages, logit_weights, lengths, table = _check_paged_inputs(q, k_cache, logit_weights, context_lens, block_table)
    batch, next_n, heads, index_dim = codes.shape
    block_size = pages.shape[1]
    positions = np.arange(table.shape[1] * block_size)  # [keys]
    query_positions = lengths[:, None] - next_n + np.arange(next_n)[None, :]  # [batch, next_n]
    visible = positions[None, None, :] <= query_positions[..., None]  # [batch, next_n, keys]
    read = positions[None, :] < lengths[:, None]  # [batch, keys]
    slot_page, slot_offset = table[:, positions // block_size], positions % block_size  # [batch, keys]
    code_field, scale_field = page_fields(pages)
    read_page, read_offset = slot_page[read], np.broadcast_to(slot_offset, read.shape)[read]
    read_codes, read_scales = code_field[read_page, read_offset], scale_field[read_page, read_offset]  # [read slots, ..]
    _check_read_slots(read_codes, read_scales, read)
    keys = np.zeros((batch, len(positions), index_dim))  # [batch, keys, index_dim]; slots no query sees stay 0, unread
    keys[read] = decode_index_keys(read_codes, read_scales)
    logit_weights = logit_weights if trace is None else trace.round_input(logit_weights)
    q_values = decode_fp8(codes).astype(dtype)  # exact in every format the arithmetic uses
    dots = matmul(q_values.reshape(batch, next_n * heads, index_dim), keys.astype(dtype).swapaxes(-1, -2))  # [batch, next_n * heads, keys]
    np.maximum(dots, 0.0, out=dots)
    logits = matmul(logit_weights.astype(dtype)[:, :, None, :], dots.reshape(batch, next_n, heads, -1))[:, :, 0]  # [batch, next_n, keys]
    return emit(trace, "DSA.18", np.where(visible, logits, -np.inf))
