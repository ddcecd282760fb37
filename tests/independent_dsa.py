"""An independent, deliberately slow float64 oracle for DeepSeek Sparse Attention (V3.2).

A test oracle only: nothing here imports mla_ref. It is written from the facts sheet
(shared/facts/v32-sparse-attention-and-fp8.md, part A, A1-A5, and recipe C), not from
the reference code, and reads as plain loops so that each step can be checked by eye:

* the Hadamard matrix is built by the Sylvester doubling H_2n = [[H, H], [H, -H]] and
  divided by sqrt(n); scores apply it by the Walsh-Hadamard butterfly (checked against it);
* the indexer RoPE is the split-half (NeoX) rotation of independent_mla.slow_rotate on
  the first qk_rope_head_dim entries of each indexer vector ([rope | nope], A1.3 step 2);
* LayerNorm (with bias, eps 1e-6, A1.1) is written out with the population variance;
* the score is I[t, s] = sum_h w[t, h] * index_n_heads^-0.5 * index_head_dim^-0.5 * ReLU(q[t, h] . k[s])
  (A1.3 step 8), -inf for a key after the query (A1.7);
* the sparse attention reuses independent_mla.slow_mla, whose visibility rule becomes
  "key j is among query i's selected keys" (the MHA form with an index mask, A2.1).

* FlashMLA's FP8 cache record (facts A3.2, B3) is read byte by byte: e4m3fn codes decoded
  from their sign, exponent and mantissa bits, little-endian float32 scales one per 128
  latent values, bf16 rope values as the top half of a float32;
* FlashMLA's two sparse kernels (facts A2.2) loop over queries, heads and the listed
  rows: decode over a paged cache (index = page * block_size + offset, -1 invalid),
  prefill over one KV (index < 0 or >= s_kv invalid); nothing valid gives out 0, lse +inf.

No FP8 emulation: this is the float64 path the issue asks to work without it.
The config only needs the attributes read here (MLA's plus index_n_heads,
index_head_dim, index_topk); weights are named relative to ``self_attn.``.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from independent_mla import _linear, _rms_norm, _softmax_with_lse, slow_frequencies, slow_mla, slow_rope_amplitude, slow_rotate

LAYER_NORM_EPS = 1e-6  # indexer k_norm = LayerNorm(index_head_dim), eps 1e-6 (facts A1.1)


def slow_hadamard(size: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix of order ``size`` (a power of two), float64."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {size}")
    rows = [[1.0]]
    while len(rows) < size:
        top = [row + row for row in rows]
        bottom = [row + [-value for value in row] for row in rows]
        rows = top + bottom
    norm = 1.0 / math.sqrt(size)
    return np.array([[value * norm for value in row] for row in rows], dtype=np.float64)


def slow_layer_norm(vector, gain, bias, eps: float = LAYER_NORM_EPS) -> np.ndarray:
    """(x - mean) / sqrt(mean((x - mean)^2) + eps) * g + b, written out."""
    x = [float(v) for v in vector]
    mean = sum(x) / len(x)
    variance = sum((v - mean) * (v - mean) for v in x) / len(x)
    inv = 1.0 / math.sqrt(variance + eps)
    return np.array([(x[k] - mean) * inv * float(gain[k]) + float(bias[k]) for k in range(len(x))], dtype=np.float64)


def _indexer_rope(vector, position: int, cfg) -> np.ndarray:
    """Split-half RoPE on the first qk_rope_head_dim entries; the rest (nope) passes unchanged."""
    rope = int(cfg.qk_rope_head_dim)
    rotated = slow_rotate(vector[:rope], position, slow_frequencies(cfg), slow_rope_amplitude(cfg), "half")
    return np.concatenate([rotated, np.asarray(vector[rope:], dtype=np.float64)])


def slow_hadamard_apply(vector) -> np.ndarray:
    """H v / sqrt(n) by the fast Walsh-Hadamard butterfly (pairs (j, j + h) -> (a + b, a - b) for h = 1, 2, 4, ...).

    The butterfly builds the same Sylvester matrix as :func:`slow_hadamard` (a test checks the two agree)."""
    values = [float(v) for v in vector]
    size = len(values)
    span = 1
    while span < size:
        for start in range(0, size, 2 * span):
            for j in range(start, start + span):
                a, b = values[j], values[j + span]
                values[j], values[j + span] = a + b, a - b
        span *= 2
    norm = 1.0 / math.sqrt(size)
    return np.array([v * norm for v in values], dtype=np.float64)


def slow_indexer_scores(cfg, weights, hidden, positions) -> np.ndarray:
    """Lightning-indexer scores I [T, T] of one sequence (row = query, column = key), -inf where not visible."""
    x_all = np.asarray(hidden, dtype=np.float64)
    pos = [int(p) for p in positions]
    n_tokens = len(pos)
    heads = int(cfg.index_n_heads)
    dim = int(cfg.index_head_dim)

    def get(name):
        return np.asarray(weights[name], dtype=np.float64)

    queries, keys, head_weights = [], [], []
    for i in range(n_tokens):
        x = x_all[i]
        query_latent = _rms_norm(_linear(x, get("q_a_proj.weight")), get("q_a_layernorm.weight"), float(cfg.rms_norm_eps))
        q_flat = _linear(query_latent, get("indexer.wq_b.weight"))
        queries.append([slow_hadamard_apply(_indexer_rope(q_flat[h * dim:(h + 1) * dim], pos[i], cfg)) for h in range(heads)])
        key = slow_layer_norm(_linear(x, get("indexer.wk.weight")), get("indexer.k_norm.weight"), get("indexer.k_norm.bias"))
        keys.append(slow_hadamard_apply(_indexer_rope(key, pos[i], cfg)))
        head_weights.append(_linear(x, get("indexer.weights_proj.weight")) / math.sqrt(heads))

    scores = np.full((n_tokens, n_tokens), -np.inf, dtype=np.float64)
    for t in range(n_tokens):
        for s in range(n_tokens):
            if pos[s] > pos[t]:
                continue
            total = 0.0
            for h in range(heads):
                dot = sum(float(a) * float(b) for a, b in zip(queries[t][h], keys[s]))
                total += float(head_weights[t][h]) * max(dot, 0.0) / math.sqrt(dim)
            scores[t, s] = total
    return scores


def slow_topk(scores_row, k: int) -> list[int]:
    """The indices of the min(k, visible) largest finite scores, ascending; a tie goes to the lower index."""
    candidates = [(-float(value), index) for index, value in enumerate(scores_row) if value != -np.inf]
    candidates.sort()
    return sorted(index for _, index in candidates[:k])


def slow_dsa_mla(cfg, weights, hidden, positions):
    """Sparse MLA of one sequence: (out [T, hidden_size], lse [heads, T], selected: list of index lists)."""
    scores = slow_indexer_scores(cfg, weights, hidden, positions)
    selected = [slow_topk(scores[t], int(cfg.index_topk)) for t in range(len(scores))]
    chosen = [set(row) for row in selected]
    out, lse = slow_mla(cfg, weights, hidden, positions, sees=lambda i, j: j in chosen[i])
    return out, lse, selected


def slow_e4m3fn(byte: int) -> float:
    """One float8_e4m3fn code: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F / 0xFF are NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * (mantissa / 8.0) * 2.0 ** -6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


def slow_decode_record(record, rank: int, rope: int) -> np.ndarray:
    """One FP8 cache record (rank e4m3 codes | rank / 128 float32 scales | rope bf16 values) to [latent | rope]."""
    data = bytes(int(b) for b in record)
    tiles = rank // 128
    scales = struct.unpack(f"<{tiles}f", data[rank:rank + 4 * tiles])
    latent = [slow_e4m3fn(data[i]) * scales[i // 128] for i in range(rank)]
    rope_bytes = data[rank + 4 * tiles:rank + 4 * tiles + 2 * rope]
    rope_values = [struct.unpack("<f", b"\x00\x00" + rope_bytes[2 * j:2 * j + 2])[0] for j in range(rope)]
    return np.array(latent + rope_values, dtype=np.float64)


def _slow_sparse_query(q_heads, rows, softmax_scale: float, head_dim_v: int):
    """One query's heads over its list of rows (None = invalid): (out [heads, head_dim_v], lse [heads])."""
    heads = len(q_heads)
    out = np.zeros((heads, head_dim_v), dtype=np.float64)
    lse = np.full(heads, np.inf, dtype=np.float64)  # FlashMLA: a query with nothing to attend gets lse +inf, out 0
    read = [row for row in rows if row is not None]
    if not read:
        return out, lse
    for h in range(heads):
        logits = [float(softmax_scale) * sum(float(a) * float(b) for a, b in zip(q_heads[h], row)) for row in read]
        probs, lse[h] = _softmax_with_lse(logits)
        for p, row in zip(probs, read):
            for d in range(head_dim_v):
                out[h, d] += p * float(row[d])
    return out, lse


def slow_sparse_decode(q, k_cache, indices, head_dim_v: int, softmax_scale: float):
    """FlashMLA sparse decode by loops: index = page * block_size + offset, -1 invalid. (out [b, s_q, h, dv], lse [b, h, s_q]).

    A uint8 cache holds FP8 records: the ones the indices read are decoded (latent width head_dim_v)."""
    q = np.asarray(q, dtype=np.float64)
    batch, s_q, heads, width = q.shape
    block_size = np.shape(k_cache)[1]
    if np.asarray(k_cache).dtype == np.uint8:
        records = k_cache
        k_cache = {}  # (page, offset) -> decoded row, only for the slots some index reads
        for i in np.unique(np.asarray(indices)[np.asarray(indices) >= 0]):
            k_cache.setdefault(int(i) // block_size, {})[int(i) % block_size] = [
                slow_decode_record(records[int(i) // block_size][int(i) % block_size][0], head_dim_v, width - head_dim_v)]
    out = np.zeros((batch, s_q, heads, head_dim_v), dtype=np.float64)
    lse = np.zeros((batch, heads, s_q), dtype=np.float64)
    for b in range(batch):
        for r in range(s_q):
            rows = [None if int(i) == -1 else k_cache[int(i) // block_size][int(i) % block_size][0] for i in indices[b][r]]
            out[b, r], lse[b, :, r] = _slow_sparse_query(q[b, r], rows, softmax_scale, head_dim_v)
    return out, lse


def slow_sparse_prefill(q, kv, indices, softmax_scale: float, head_dim_v: int):
    """FlashMLA sparse prefill by loops: index i reads kv[i, 0]; i < 0 or i >= s_kv is invalid. (out [s_q, h, dv], lse [s_q, h])."""
    q = np.asarray(q, dtype=np.float64)
    s_q, heads, _ = q.shape
    s_kv = len(kv)
    out = np.zeros((s_q, heads, head_dim_v), dtype=np.float64)
    lse = np.zeros((s_q, heads), dtype=np.float64)
    for r in range(s_q):
        rows = [kv[int(i)][0] if 0 <= int(i) < s_kv else None for i in indices[r][0]]
        out[r], lse[r] = _slow_sparse_query(q[r], rows, softmax_scale, head_dim_v)
    return out, lse
