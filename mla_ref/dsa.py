"""DSA — DeepSeek Sparse Attention (DeepSeek-V3.2), one function per step of spec/dsa.yaml.

The lightning indexer (DSA.1-DSA.10) scores every visible key for every query and keeps the
top ``index_topk``; sparse MLA (DSA.11-DSA.12) attends to the selected latent rows only.
:func:`indexer_forward` is the indexer on its own; :func:`mla_ref.mla.mla_forward` runs the
whole sparse layer when the config sets ``index_topk``. Shapes use the config's names;
``index_heads`` = index_n_heads, ``index_dim`` = index_head_dim, ``selected`` =
min(index_topk, keys).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import numpy as np
import numpy.typing as npt

from . import mla  # DSA builds on MLA's steps; mla refers to this module by name too, so either may be imported first
from .cache import LatentCache, PagedLatentCache, config_fingerprint
from .checks import check_int_vector, check_tensor, compute_dtype
from .config import ModelConfig
from .errors import CacheError, ConfigError, InputError, ShapeError
from .fp8 import act_quant, decode_fp8
from .precision import matmul
from .rope import apply_rope, rope_angles
from .trace import Trace, emit
from .weights import attention_weight_shapes, check_weights

# Bound on the elements of one [batch, query chunk, index_heads, keys] block of q.k products (DSA.8).
DEFAULT_SCORE_ELEMENTS = 1 << 21


def indexer_query(config: ModelConfig, c_q: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """DSA.1 — ``q_index = c_q @ Wq_b_I.T`` per index head, from the query latent after q_a_layernorm (V32P eq. 1)."""
    q = matmul(c_q, weights["indexer.wq_b.weight"].T)  # [batch, seq, index_heads * index_dim]
    return q.reshape(q.shape[:-1] + (config.index_n_heads, config.index_head_dim))  # [batch, seq, index_heads, index_dim]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with the biased variance, as ``torch.nn.LayerNorm`` (DSA.2's key norm)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = np.mean(np.square(centred), axis=-1, keepdims=True)  # [..., 1]
    return centred / np.sqrt(variance + eps) * weight + bias


def indexer_key(config: ModelConfig, hidden: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """DSA.2 — ``k_index = LayerNorm(x @ Wk_I.T)`` with weight and bias: one key head per token (V32P eq. 1)."""
    k = matmul(hidden, weights["indexer.wk.weight"].T)  # [batch, seq, index_dim]
    return layer_norm(k, weights["indexer.k_norm.weight"], weights["indexer.k_norm.bias"], config.index_norm_eps)


def indexer_head_weights(config: ModelConfig, hidden: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """DSA.3 — ``w = (x @ W_proj.T) * index_n_heads^-0.5``, one signed weight per index head (V32P eq. 1)."""
    return matmul(hidden, weights["indexer.weights_proj.weight"].T) * config.index_n_heads ** -0.5  # [batch, seq, index_heads]


def indexer_rope(config: ModelConfig, q_index: np.ndarray, k_index: np.ndarray, positions: np.ndarray,
                 table_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """DSA.4 — half-layout (NeoX) RoPE on the FIRST qk_rope_head_dim dims of q and k, MLA's YaRN table (EXP 8631a81).

    The indexer's dims are ``[rope | nope]`` and pair ``(i, i + d/2)``, whatever MLA's layout.
    """
    rope = config.qk_rope_head_dim
    cos, sin = rope_angles(config, positions, q_index.dtype, table_dtype)  # [batch, seq, rope_half]
    q_rotated = q_index.copy()
    q_rotated[..., :rope] = apply_rope(q_index[..., :rope], cos[:, :, None, :], sin[:, :, None, :], "half")
    k_rotated = k_index.copy()
    k_rotated[..., :rope] = apply_rope(k_index[..., :rope], cos, sin, "half")
    return q_rotated, k_rotated  # [batch, seq, index_heads, index_dim], [batch, seq, index_dim]


@functools.lru_cache(maxsize=8)
def hadamard_matrix(width: int) -> np.ndarray:
    """The normalised Sylvester Hadamard ``H[i, j] = (-1)^popcount(i & j) / sqrt(width)`` (read-only, ``width`` a power of two)."""
    index = np.arange(width)
    common = index[:, None] & index[None, :]  # [width, width]
    parity = np.zeros((width, width), np.int64)
    for bit in range(max(1, width.bit_length())):
        parity ^= (common >> bit) & 1
    matrix = (1.0 - 2.0 * parity) / math.sqrt(width)
    matrix.flags.writeable = False
    return matrix


def hadamard_rotate(x: np.ndarray) -> np.ndarray:
    """DSA.5 — ``x @ H / sqrt(d)`` with the Sylvester Hadamard H on the last axis (EXP rotate_activation; FHT)."""
    return matmul(x, hadamard_matrix(x.shape[-1]).astype(x.dtype, copy=False))  # [..., index_dim]


def _fp8_round_trip(x: np.ndarray) -> np.ndarray:
    """FP8.6 (ue8m0) then FP8.1 times the scale: ``x`` as the indexer's e4m3 codes and power-of-two scales represent it."""
    codes, scale = act_quant(x, "ue8m0")  # [..., index_dim] uint8, [..., index_dim / 128] float32
    values = decode_fp8(codes).reshape(x.shape[:-1] + (scale.shape[-1], -1)) * scale[..., None].astype(np.float64)
    return values.reshape(x.shape).astype(x.dtype, copy=False)


def indexer_quantize(q_index: np.ndarray, k_index: np.ndarray, quantize: bool) -> tuple[np.ndarray, np.ndarray]:
    """DSA.6 — optional FP8: q per (token, head) and k per token to e4m3fn with ue8m0 scales, dequantised (EXP act_quant)."""
    if not quantize:
        return q_index, k_index
    return _fp8_round_trip(q_index), _fp8_round_trip(k_index)


def stored_index_keys(index_keys: np.ndarray, quantize: bool) -> np.ndarray:
    """DSA.7 — cached indexer keys ``[batch, keys, index_dim]`` as an FP8 cache holds them: with DSA.6's FP8 on, rows given as
    floats (a cached prefix) go through the same round trip, which leaves rows DSA.6 already quantised unchanged."""
    return _fp8_round_trip(index_keys) if quantize else index_keys


def index_scores(q_hat: np.ndarray, k_hat: np.ndarray, head_weights: np.ndarray) -> np.ndarray:
    """DSA.8 — ``I[t, s] = sum_h w[t, h] * d^-0.5 * ReLU(q_hat[t, h] . k_hat[s])`` (V32P eq. 1; EXP fp8_index)."""
    batch, seq, heads, width = q_hat.shape
    dots = matmul(q_hat.reshape(batch, seq * heads, width), k_hat.swapaxes(-1, -2))  # [batch, seq * index_heads, keys]
    np.maximum(dots, 0.0, out=dots)
    dots *= width ** -0.5
    per_head = dots.reshape(batch, seq, heads, k_hat.shape[1])  # [batch, seq, index_heads, keys]
    return matmul(head_weights[:, :, None, :], per_head)[:, :, 0]  # [batch, seq, keys]


def index_visibility(scores: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """DSA.9 — scores of keys a query may not see (MLA.8: future keys, padding) become -inf (EXP index_score += mask)."""
    return np.where(visible, scores, -np.inf)  # [batch, seq, keys]


def select_top_k(masked_scores: np.ndarray, index_topk: int) -> np.ndarray:
    """DSA.10 — the top ``min(index_topk, visible)`` keys per query, by descending score then ascending position; -1 pads (V32P eq. 2).

    Returns ``indices [batch, seq, min(index_topk, keys)]`` in rank order.
    """
    selected = min(index_topk, masked_scores.shape[-1])
    order = np.argsort(-masked_scores, axis=-1, kind="stable")[..., :selected]  # stable: equal scores keep ascending positions
    kept_scores = np.take_along_axis(masked_scores, order, axis=-1)
    return np.where(kept_scores > -np.inf, order, -1)  # [batch, seq, selected]


def gather_selected_rows(key_rows: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DSA.11 — the latent rows each query selected, ``valid = indices >= 0``; invalid slots are 0, never row -1 (FM gather)."""
    valid = indices >= 0  # [batch, seq, selected]
    batch_index = np.arange(key_rows.shape[0])[:, None, None]
    rows = key_rows[batch_index, np.where(valid, indices, 0)]  # [batch, seq, selected, width]
    return np.where(valid[..., None], rows, 0.0), valid


def sparse_latent_attention(q_latent: np.ndarray, selected_rows: np.ndarray, valid: np.ndarray, softmax_scale: float,
                            head_dim_v: int) -> tuple[np.ndarray, np.ndarray]:
    """DSA.12 — absorbed MLA over each query's selected rows: logits, MLA.10's softmax over valid slots, latent values (V32P eq. 2, App. A).

    Returns ``out_latent [batch, seq, heads, head_dim_v]`` and the natural-log ``lse [batch, heads, seq]``.
    """
    logits = matmul(q_latent, selected_rows.swapaxes(-1, -2))  # [batch, seq, heads, selected]
    logits *= softmax_scale
    probs, lse = mla.masked_softmax(logits.transpose(0, 2, 1, 3), valid[:, None])  # [batch, heads, seq, selected], [batch, heads, seq]
    out_latent = matmul(probs.transpose(0, 2, 1, 3), selected_rows[..., :head_dim_v])  # [batch, seq, heads, head_dim_v]
    return out_latent, lse


def selected_visibility(indices: np.ndarray, num_keys: int) -> np.ndarray:
    """``[batch, seq, keys]``: True at the positions DSA.10 selected (the index mask that narrows MLA.10 in the naive form)."""
    mask = np.zeros(indices.shape[:2] + (num_keys + 1,), bool)  # the extra column takes the -1 padding
    np.put_along_axis(mask, np.where(indices >= 0, indices, num_keys), True, axis=-1)
    return mask[..., :num_keys]


# ------------------------------------------------------------------ the indexer key cache (DSA.7)

@dataclasses.dataclass(frozen=True)
class SparseCache:
    """The cache of a DSA layer: the latent rows (contiguous or paged, MLA.18) and the indexer's own key rows, in step."""

    latent: LatentCache | PagedLatentCache
    index_keys: LatentCache  # rows [batch, capacity, index_head_dim]: k_hat per token (DSA.6)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, dtype: npt.DTypeLike = np.float64, *, latent: LatentCache | PagedLatentCache | None = None) -> "SparseCache":
        """An empty cache for ``batch`` sequences; ``latent``: an empty paged (or contiguous) latent cache to use instead of a contiguous one."""
        if not config.sparse_attention:
            raise ConfigError("index_topk", "a SparseCache is for a DSA config (index_topk set), got null", "DSA.7")
        latent = LatentCache.empty(config, batch, dtype) if latent is None else latent
        return cls(latent, LatentCache.empty(config, batch, dtype, width=config.index_head_dim))

    @property
    def lengths(self) -> np.ndarray:
        return self.latent.lengths

    @property
    def dtype(self) -> np.dtype:
        return self.latent.dtype

    def check(self, config: ModelConfig, batch: int) -> None:
        """Raise ``CacheError`` unless both parts fit ``config`` and ``batch`` and hold the same positions."""
        self.latent.check(config, batch)
        rows = self.index_keys.rows
        if not config.sparse_attention or rows.shape[0] != batch or rows.shape[-1] != config.index_head_dim:
            raise CacheError("cache.index_keys", f"expected rows [{batch}, capacity, index_head_dim = {config.index_head_dim}], "
                             f"got {list(rows.shape)}", "DSA.7")
        foreign = self.index_keys.fingerprint not in (None, config_fingerprint(config))
        if foreign or not np.array_equal(self.index_keys.lengths, self.lengths):
            raise CacheError("cache.index_keys", f"holds {self.index_keys.lengths.tolist()} positions for another config or lengths; "
                             f"the latent cache holds {self.lengths.tolist()}", "DSA.7")

    def append(self, new_rows: np.ndarray, new_index_keys: np.ndarray, query_lengths: np.ndarray) -> "SparseCache":
        """DSA.7 — write the latent rows (MLA.18) and the indexer keys ``k_hat [batch, seq, index_dim]`` of the new tokens."""
        return SparseCache(self.latent.append(new_rows, query_lengths), self.index_keys.append(new_index_keys, query_lengths))

    def key_rows(self) -> np.ndarray:
        """The latent rows ``[batch, keys, kv_lora_rank + qk_rope_head_dim]`` (MLA.18)."""
        return self.latent.key_rows()

    def index_key_rows(self) -> np.ndarray:
        """The indexer keys ``[batch, keys, index_head_dim]`` (DSA.7)."""
        return self.index_keys.key_rows()

    def truncate(self, lengths: npt.ArrayLike) -> "SparseCache":
        """Forget positions >= ``lengths`` in both parts (a rollback)."""
        return SparseCache(self.latent.truncate(lengths), self.index_keys.truncate(lengths))


# ------------------------------------------------------------------ the indexer and the sparse layer, composed

def indexer_query_key(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: np.ndarray, c_q: np.ndarray,
                      positions: np.ndarray, quantize: bool = False, table_dtype=np.float64,
                      trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DSA.1 -> DSA.6 for new tokens: ``q_hat [batch, seq, index_heads, index_dim]``, ``k_hat [batch, seq, index_dim]``, head weights."""
    q_index = emit(trace, "DSA.1", indexer_query(config, c_q, weights))
    k_index = emit(trace, "DSA.2", indexer_key(config, hidden, weights))
    head_weights = emit(trace, "DSA.3", indexer_head_weights(config, hidden, weights))  # [batch, seq, index_heads]
    q_index, k_index = emit(trace, "DSA.4", *indexer_rope(config, q_index, k_index, positions, table_dtype))
    q_index = emit(trace, "DSA.5", hadamard_rotate(q_index))
    k_index = hadamard_rotate(k_index)
    q_hat, k_hat = emit(trace, "DSA.6", *indexer_quantize(q_index, k_index, quantize))
    return q_hat, k_hat, head_weights


def check_forced_indices(forced_indices: npt.ArrayLike, shape: tuple[int, int, int], keys: int) -> np.ndarray:
    """Another implementation's DSA.10 selection ``[batch, seq, selected]`` as int64: integers in -1 .. keys - 1 (TOLERANCE.4)."""
    indices = np.asarray(forced_indices)
    if indices.dtype.kind not in "iu" or indices.shape != shape:
        raise ShapeError("forced_indices", f"expected integers of shape {list(shape)}, got {indices.dtype} {list(indices.shape)}", "DSA.10")
    if indices.size and (indices.min() < -1 or indices.max() >= keys):
        raise InputError("forced_indices", f"expected key positions in 0 .. {keys - 1} or -1, got {indices.min()} .. {indices.max()}", "DSA.10")
    return indices.astype(np.int64)


def select_keys(config: ModelConfig, q_hat: np.ndarray, k_hat: np.ndarray, head_weights: np.ndarray, visible: np.ndarray,
                keep_scores: bool = False, trace: Trace | None = None,
                forced_indices: npt.ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """DSA.8 -> DSA.10 over blocks of queries: ``indices [batch, seq, selected]`` and (``keep_scores``) the masked scores.

    A block of queries holds about DEFAULT_SCORE_ELEMENTS q.k products; with a trace there is one block.
    ``forced_indices [batch, seq, selected]`` replaces DSA.10's choice (teacher forcing: another implementation's
    acceptable selection, TOLERANCE.4); the scores are computed all the same.
    """
    batch, seq, heads, _ = q_hat.shape
    keys = k_hat.shape[1]
    chunk = seq if trace is not None else max(1, DEFAULT_SCORE_ELEMENTS // max(1, batch * heads * keys))
    indices = np.empty((batch, seq, min(config.index_topk, keys)), np.int64)
    forced = None if forced_indices is None else check_forced_indices(forced_indices, indices.shape, keys)
    scores = np.empty((batch, seq, keys), q_hat.dtype) if keep_scores else None
    for start in range(0, seq, chunk):
        block = slice(start, start + chunk)
        raw = emit(trace, "DSA.8", index_scores(q_hat[:, block], k_hat, head_weights[:, block]))
        masked = emit(trace, "DSA.9", index_visibility(raw, visible[:, block]))
        chosen = select_top_k(masked, config.index_topk) if forced is None else forced[:, block]
        indices[:, block] = emit(trace, "DSA.10", chosen)
        if scores is not None:
            scores[:, block] = masked
    return indices, scores


def sparse_attention(q_latent: np.ndarray, key_rows: np.ndarray, indices: np.ndarray, softmax_scale: float, head_dim_v: int,
                     query_chunk: int | None = None, trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DSA.11 -> DSA.12 over blocks of queries: ``out_latent [batch, seq, heads, head_dim_v]``, ``lse [batch, heads, seq]``.

    The gathered rows of one block, ``[batch, chunk, selected, width]``, hold about DEFAULT_SCORE_ELEMENTS values.
    """
    batch, seq, heads, _ = q_latent.shape
    per_query = max(1, batch * indices.shape[-1] * key_rows.shape[-1])
    chunk = seq if trace is not None else (query_chunk or max(1, DEFAULT_SCORE_ELEMENTS // per_query))
    out = np.empty((batch, seq, heads, head_dim_v), q_latent.dtype)
    lse = np.empty((batch, heads, seq), q_latent.dtype)
    for start in range(0, seq, chunk):
        block = slice(start, start + chunk)
        rows, valid = emit(trace, "DSA.11", *gather_selected_rows(key_rows, indices[:, block]))
        out[:, block], lse[:, :, block] = emit(trace, "DSA.12", *sparse_latent_attention(q_latent[:, block], rows, valid, softmax_scale, head_dim_v))
    return out, lse


@dataclasses.dataclass(frozen=True)
class IndexerResult:
    """``scores [batch, seq, seq]`` (DSA.9, -inf where not visible), ``indices [batch, seq, selected]`` (DSA.10), ``index_keys`` (DSA.6's k_hat)."""

    scores: np.ndarray
    indices: np.ndarray
    index_keys: np.ndarray


def indexer_forward(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: np.ndarray,
                    start_positions: npt.ArrayLike | None = None, *, query_lengths: npt.ArrayLike | None = None,
                    quantize: bool = False, dtype: npt.DTypeLike = np.float64, forced_indices: npt.ArrayLike | None = None,
                    trace: Trace | None = None) -> IndexerResult:
    """The lightning indexer of one layer (DSA.1-DSA.10) on a batch of tokens, causal among them (MLA.8).

    ``weights``: the attention tensors relative to ``self_attn.`` (the indexer reads MLA.1's
    q_a_proj and q_a_layernorm and its own ``indexer.*``). ``hidden [batch, seq, hidden_size]``
    is the attention input; token i of sequence b sits at position ``start_positions[b] + i``
    (default 0; RoPE only). ``query_lengths`` marks right padding. ``quantize``: DSA.6's FP8 (also on
    under a trace whose profile sets ``indexer_fp8``, the fp8 profile). ``forced_indices``: another implementation's
    selection in place of DSA.10's (TOLERANCE.4). The layer with a cache is :func:`mla_ref.mla.mla_forward`.
    """
    if not config.sparse_attention:
        raise ConfigError("index_topk", "the indexer needs a DSA config (index_topk, index_n_heads, index_head_dim set), got null", "DSA.1")
    dtype = compute_dtype(dtype)
    w = check_weights(attention_weight_shapes(config), weights, "DSA.weights", dtype)
    x = check_tensor("hidden", hidden, ("batch", "seq", config.hidden_size), "DSA.1", dtype)
    if trace is not None:
        w = {name: trace.round_input(value, "weights") for name, value in w.items()}
        x = trace.round_input(x)
    batch, seq, _ = x.shape
    lengths = np.full(batch, seq, np.int64) if query_lengths is None else check_int_vector("query_lengths", query_lengths, batch, "MLA.8")
    if (lengths > seq).any():
        raise InputError("query_lengths", f"expected values <= seq = {seq}, got {lengths.tolist()}", "MLA.8")
    starts = np.zeros(batch, np.int64) if start_positions is None else check_int_vector("start_positions", start_positions, batch, "MLA.4")
    positions = starts[:, None] + np.arange(seq)[None, :]  # [batch, seq]
    c_q = emit(trace, "MLA.1", mla.query_latent(x, w, config.rms_norm_eps))
    table_dtype = np.float64 if trace is None else trace.rope_table
    quantize = quantize or (trace is not None and trace.indexer_fp8)  # DSA.6: asked for, or a precision effect of the profile
    q_hat, k_hat, head_weights = indexer_query_key(config, w, x, c_q, positions, quantize, table_dtype, trace)
    visible = emit(trace, "MLA.8", mla.causal_visibility(np.zeros(batch, np.int64), lengths, seq, seq))
    indices, scores = select_keys(config, q_hat, k_hat, head_weights, visible, keep_scores=True, trace=trace, forced_indices=forced_indices)
    return IndexerResult(scores, indices, k_hat)
