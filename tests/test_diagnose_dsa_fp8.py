"""Diagnoses of DSA and FP8 bugs from outputs alone, in the default suite (no torch): each bug is planted in a candidate
built independently of mla_ref, and the checker must name it first, or name the constant factor it multiplies by.

The candidates follow the facts sheet (shared/facts/v32-sparse-attention-and-fp8.md) through the slow oracles of
tests/ (independent_dsa.py, independent_mla.py): the indexer below is independent_dsa's recipe with its score loop
written as one einsum (the T x T x heads x dim loop of the oracle costs a second per case), checked against the
oracle on a slice; attention is independent_mla.slow_mla; FP8 weights and cache records are decoded byte by byte
by the oracles' e4m3fn readers. The torch mutant zoo (tests/test_dsa_mutants.py, slow) names the same bugs in a
real kernel; these tests keep each diagnosis variant of diagnose.py guarded by the default suite.
"""

from __future__ import annotations

import functools
import math
import struct
import types

import numpy as np
import pytest

import independent_dsa as slow_dsa
import independent_mla as slow
from mla_ref.config import from_dict, load_preset
from mla_ref.conformance.check import load_case, run_case
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest

INDEXER, PREFILL = "dsa.indexer/tiny-dsa/seed0", "dsa.prefill/tiny-dsa/seed0"


@functools.lru_cache(maxsize=None)
def _manifest_cases() -> dict:
    return read_manifest(default_golden_dir() / "manifest.yaml")["cases"]


def _only_case(adapter, case_id: str, profile: str = "fp32"):
    """The checker's verdict and diagnosis of one case: run_case as check(adapter, profile, select=case_id) calls it, without
    check()'s fresh copy of the manifest per call (a tenth of a second; the tests of check() cover that part)."""
    return run_case(adapter, default_golden_dir(), case_id, _manifest_cases()[case_id], profile)


def _named_first(case, expected: str) -> None:
    named = [text for text in case.diagnosis if text.startswith("matches the reference with this bug")]
    assert case.status == "fail", case.reason
    assert named and expected in named[0], case.diagnosis
    assert not any("no known pattern" in text for text in case.diagnosis), case.diagnosis


# ------------------------------------------------------------------ the lightning indexer (DSA.1-DSA.10)

CORRECT = types.MappingProxyType({"layout": "half", "rope_last": False, "hadamard_q": True, "hadamard_k": True,
                                  "relu_first": True, "causal": True, "clamped": True, "head_scale": True, "dim_scale": True})


@functools.lru_cache(maxsize=None)
def _hadamard(size: int) -> np.ndarray:
    return slow_dsa.slow_hadamard(size)


def _rotate(cfg, vector, position: int, bug: dict) -> np.ndarray:
    """DSA.4 on one indexer vector: [rope | nope] in half pairs; the bugs rotate in interleaved pairs or the last dims."""
    rope = cfg.qk_rope_head_dim
    part = slice(len(vector) - rope, None) if bug["rope_last"] else slice(0, rope)
    out = np.array(vector, dtype=np.float64)
    out[part] = slow.slow_rotate(vector[part], position, slow.slow_frequencies(cfg), slow.slow_rope_amplitude(cfg), bug["layout"])
    return out


def _index_projections(cfg, weights, x, position: int, bug: dict):
    """One token's index queries [heads, dim], index key [dim] (both after RoPE and Hadamard) and head weights [heads]."""
    get = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items() if name.startswith(("q_a_", "indexer."))}
    heads, dim, hadamard = cfg.index_n_heads, cfg.index_head_dim, _hadamard(cfg.index_head_dim)
    c_q = slow._rms_norm(slow._linear(x, get["q_a_proj.weight"]), get["q_a_layernorm.weight"], cfg.rms_norm_eps)
    q_flat = slow._linear(c_q, get["indexer.wq_b.weight"])
    queries = [_rotate(cfg, q_flat[h * dim:(h + 1) * dim], position, bug) for h in range(heads)]
    key = _rotate(cfg, slow_dsa.slow_layer_norm(slow._linear(x, get["indexer.wk.weight"]), get["indexer.k_norm.weight"],
                                                get["indexer.k_norm.bias"], cfg.index_norm_eps), position, bug)
    head_weights = slow._linear(x, get["indexer.weights_proj.weight"]) / (math.sqrt(heads) if bug["head_scale"] else 1.0)
    return (np.array([hadamard @ q if bug["hadamard_q"] else q for q in queries]), hadamard @ key if bug["hadamard_k"] else key,
            head_weights)


def _selection(cfg, queries, keys, head_weights, query_positions, key_positions, bug: dict):
    """Masked index scores [T, keys] and the selected key sets of queries [T, heads, dim] over keys [keys, dim]."""
    dots = np.einsum("thd,sd->ths", queries, keys) / (math.sqrt(cfg.index_head_dim) if bug["dim_scale"] else 1.0)
    weighted = np.asarray(head_weights)[:, :, None]  # [T, heads, 1]
    scores = (weighted * np.maximum(dots, 0.0) if bug["relu_first"] else np.maximum(weighted * dots, 0.0)).sum(axis=1)
    if bug["causal"]:
        scores = np.where(np.asarray(key_positions)[None, :] <= np.asarray(query_positions)[:, None], scores, -np.inf)
    if bug["clamped"]:
        return scores, [slow_dsa.slow_topk(row, cfg.index_topk) for row in scores]
    # the k largest of every key, -inf ones included (ties: the lower index)
    return scores, [sorted(sorted(range(len(row)), key=lambda s, row=row: (-row[s], s))[: cfg.index_topk]) for row in scores]


def _indexer_rows(cfg, weights, hidden, positions, bug: dict):
    """One sequence: (masked scores [T, T], selected key sets) of the indexer with ``bug``'s changes to CORRECT."""
    queries, keys, head_weights = zip(*(_index_projections(cfg, weights, x, position, bug)
                                        for x, position in zip(np.asarray(hidden, dtype=np.float64), positions)))
    return _selection(cfg, np.array(queries), np.array(keys), np.array(head_weights), positions, positions, bug)


def _padded(selected: list[list[int]], topk: int) -> list[list[int]]:
    return [row + [-1] * (topk - len(row)) for row in selected]


def _indexer_adapter(**changes) -> types.SimpleNamespace:
    bug = {**CORRECT, **changes}

    def dsa_indexer(config, weights, hidden, start_positions):
        cfg = from_dict(config)
        rows = [_indexer_rows(cfg, weights, row, int(start) + np.arange(len(row)), bug) for row, start in zip(hidden, start_positions)]
        return {"indices": np.array([_padded(selected, cfg.index_topk) for _, selected in rows]),
                "scores": np.array([scores for scores, _ in rows])}
    return types.SimpleNamespace(dsa_indexer=dsa_indexer)


def test_the_fast_indexer_is_the_slow_oracle():
    """The einsum form above against independent_dsa's loops, on the first 12 tokens of the golden case's first sequence."""
    entry = _manifest_cases()[INDEXER]
    case, cfg = load_case(default_golden_dir(), entry), from_dict(entry["config"])
    hidden, positions = case["input"]["hidden"][0, :12], int(case["input"]["start_positions"][0]) + np.arange(12)
    scores, selected = _indexer_rows(cfg, case["weight"], hidden, positions, dict(CORRECT))
    oracle = slow_dsa.slow_indexer_scores(cfg, case["weight"], hidden, positions)
    assert np.array_equal(np.isfinite(scores), np.isfinite(oracle)) and np.isfinite(oracle).sum() == 12 * 13 // 2
    assert np.allclose(scores[np.isfinite(scores)], oracle[np.isfinite(oracle)], rtol=1e-12, atol=1e-12)
    assert selected == [slow_dsa.slow_topk(row, cfg.index_topk) for row in oracle]


INDEXER_BUGS = {  # bug -> (its changes to CORRECT, the variant the diagnosis must name first)
    "rope_interleaved": ({"layout": "interleaved"}, "indexer RoPE in interleaved pairs"),
    "rope_on_the_last_dims": ({"rope_last": True}, "indexer RoPE on the last qk_rope_head_dim dims"),
    "hadamard_missing_on_q": ({"hadamard_q": False}, "Hadamard on one side of the index scores only"),  # q.(Hk) = (Hq).k: one test
    "relu_after_head_weights": ({"relu_first": False}, "ReLU after the index head weights (not before)"),
    "no_causal_mask": ({"causal": False}, "no causal mask before the indexer's top-k"),
    "topk_not_clamped": ({"clamped": False}, "indexer top-k not clamped to the visible keys"),
}


@pytest.mark.parametrize("bug", list(INDEXER_BUGS))
def test_indexer_bug_is_named_from_outputs_alone(bug):
    changes, expected = INDEXER_BUGS[bug]
    _named_first(_only_case(_indexer_adapter(**changes), INDEXER), expected)


@pytest.mark.parametrize("change, factor_name, factor", [
    ("head_scale", "indexer head weights without index_n_heads^-0.5 (DSA.3)", "index_n_heads"),
    ("dim_scale", "index scores without index_head_dim^-0.5 (DSA.8)", "index_head_dim")])
def test_a_missing_index_score_scale_is_named_by_its_factor(change, factor_name, factor):
    """A positive factor on every index score keeps the selection: only the scores fail, sqrt(factor) x the truth."""
    case = _only_case(_indexer_adapter(**{change: False}), INDEXER)
    assert [c.name for c in case.comparisons if not c.passed] == ["scores"], case.reason
    root = math.sqrt(getattr(load_preset("tiny-dsa"), factor))
    assert case.diagnosis == [f"scores is {root:.4f} x the truth (sqrt({factor}) = {root:.4g}: {factor_name})"], case.diagnosis


def test_the_correct_independent_indexer_passes():
    case = _only_case(_indexer_adapter(), INDEXER)
    assert case.status == "pass" and not case.diagnosis, case.reason


def test_a_variant_that_would_change_a_passing_float_output_is_not_named():
    """Indices selected without the causal mask, scores returned masked and right: the unmasked variant reproduces the
    failing indices exactly but also unmasks the scores the candidate got right, so it is not this candidate's bug."""
    unmasked, correct = _indexer_adapter(causal=False).dsa_indexer, _indexer_adapter().dsa_indexer

    def dsa_indexer(*args):
        return {"indices": unmasked(*args)["indices"], "scores": correct(*args)["scores"]}
    case = _only_case(types.SimpleNamespace(dsa_indexer=dsa_indexer), INDEXER)
    assert [c.name for c in case.comparisons if not c.passed] == ["indices"], case.reason
    assert len(case.diagnosis) == 1 and case.diagnosis[0].startswith("no known pattern"), case.diagnosis


# ------------------------------------------------------------------ sparse attention (DSA.11-DSA.12)


def _prefill_adapter(dense: bool) -> types.SimpleNamespace:
    """dsa_prefill: the independent indexer's selection, then independent_mla's attention over the selected keys (or, with
    ``dense``, over every causally visible key: the selection ignored)."""
    def dsa_prefill(config, weights, hidden, start_positions):
        cfg, outputs, lses, indices = from_dict(config), [], [], []
        for row, start in zip(hidden, start_positions):
            _, selected = _indexer_rows(cfg, weights, row, int(start) + np.arange(len(row)), dict(CORRECT))
            chosen = [set(keys) for keys in selected]
            out, lse = slow.slow_mla(cfg, weights, row, int(start) + np.arange(len(row)), None if dense else lambda i, j: j in chosen[i])
            outputs.append(out), lses.append(lse), indices.append(_padded(selected, cfg.index_topk))
        return {"output": np.stack(outputs), "indices": np.array(indices), "lse": np.stack(lses)}
    return types.SimpleNamespace(dsa_prefill=dsa_prefill)


def test_dense_attention_is_named_from_outputs_alone():
    """The selection is returned right but not used: output and lse fail, and the dense layer is named."""
    case = _only_case(_prefill_adapter(dense=True), PREFILL)
    assert sorted(c.name for c in case.comparisons if not c.passed) == ["lse", "output"], case.reason
    _named_first(case, "dense attention: the indexer's selection ignored")


def test_the_correct_independent_sparse_layer_passes():
    case = _only_case(_prefill_adapter(dense=False), PREFILL)
    assert case.status == "pass" and not case.diagnosis, case.reason


def _extend_token(cfg, weights, x, position: int):
    """One new token's latent row [kv_lora_rank + rope] and its per-head (q_nope [heads, nope], rotated q_pe [heads, rope])."""
    get = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
    rank, nope, rope, eps = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    frequencies, amplitude = slow.slow_frequencies(cfg), slow.slow_rope_amplitude(cfg)
    kv_a = slow._linear(x, get["kv_a_proj_with_mqa.weight"])
    row = np.concatenate([slow._rms_norm(kv_a[:rank], get["kv_a_layernorm.weight"], eps),
                          slow.slow_rotate(kv_a[rank:], position, frequencies, amplitude, cfg.rope_layout)])
    q = slow._linear(slow._rms_norm(slow._linear(x, get["q_a_proj.weight"]), get["q_a_layernorm.weight"], eps),
                     get["q_b_proj.weight"]).reshape(cfg.num_attention_heads, nope + rope)
    return row, q[:, :nope], np.array([slow.slow_rotate(head, position, frequencies, amplitude, cfg.rope_layout) for head in q[:, nope:]])


def _extend_adapter(**changes) -> types.SimpleNamespace:
    """dsa_extend in the absorbed form, per query: index scores over the cached and new indexer keys (bottom-right causal),
    then latent attention over the selected latent rows; right-padded queries give zeros, -1 and lse -inf."""
    bug = {**CORRECT, **changes}

    def dsa_extend(config, weights, hidden, cache_rows, index_key_rows, cache_lengths, query_lengths):
        cfg = from_dict(config)
        heads, nope, rank, topk = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.index_topk
        kv_b = np.asarray(weights["kv_b_proj.weight"], dtype=np.float64).reshape(heads, nope + cfg.v_head_dim, rank)
        batch, seq = np.shape(hidden)[:2]
        out = {"output": np.zeros((batch, seq, np.shape(hidden)[2])), "rows": np.zeros((batch, seq, rank + cfg.qk_rope_head_dim)),
               "index_keys": np.zeros((batch, seq, cfg.index_head_dim)), "indices": np.full((batch, seq, topk), -1),
               "lse": np.full((batch, heads, seq), -np.inf)}
        for b in range(batch):
            prefix, new = int(cache_lengths[b]), int(query_lengths[b])
            positions = prefix + np.arange(new)
            tokens = [_extend_token(cfg, weights, x, p) for x, p in zip(np.asarray(hidden[b], dtype=np.float64), positions)]
            index = [_index_projections(cfg, weights, x, p, bug) for x, p in zip(np.asarray(hidden[b], dtype=np.float64), positions)]
            rows = np.concatenate([np.asarray(cache_rows[b][:prefix], dtype=np.float64), [row for row, _, _ in tokens]])
            keys = np.concatenate([np.asarray(index_key_rows[b][:prefix], dtype=np.float64), [key for _, key, _ in index]])
            _, selected = _selection(cfg, np.array([q for q, _, _ in index]), keys, np.array([w for _, _, w in index]),
                                     positions, np.arange(prefix + new), bug)
            out["rows"][b, :new], out["index_keys"][b, :new] = rows[prefix:], keys[prefix:]
            out["indices"][b, :new] = _padded(selected, topk)
            for t, ((_, q_nope, q_pe), chosen) in enumerate(zip(tokens, selected)):
                attended, values = [], []
                for h in range(heads):
                    q_latent = q_nope[h] @ kv_b[h, :nope]  # [rank]: W_uk absorbed into the query
                    logits = [slow.slow_softmax_scale(cfg) * (q_latent @ rows[j, :rank] + q_pe[h] @ rows[j, rank:]) for j in chosen]
                    probs, out["lse"][b, h, t] = slow._softmax_with_lse(logits)
                    attended.append(kv_b[h, nope:] @ sum(p * rows[j, :rank] for p, j in zip(probs, chosen)))
                out["output"][b, t] = slow._linear(np.concatenate(attended), weights["o_proj.weight"])
        return out
    return types.SimpleNamespace(dsa_extend=dsa_extend)


EXTEND = "dsa.extend.chunked/tiny-dsa/seed0"
EXTEND_BUGS = {  # the cached keys carry the Hadamard, so the side it is missing on shows
    "hadamard_missing_on_q": ({"hadamard_q": False}, "Hadamard missing on the index queries (keys rotated)"),
    "hadamard_missing_on_new_keys": ({"hadamard_k": False}, "Hadamard missing on the new index keys"),
    "hadamard_missing_on_both": ({"hadamard_q": False, "hadamard_k": False}, "Hadamard missing on both index queries and new keys"),
}


@pytest.mark.parametrize("bug", list(EXTEND_BUGS))
def test_the_side_of_a_missing_hadamard_is_named_after_a_cached_prefix(bug):
    changes, expected = EXTEND_BUGS[bug]
    _named_first(_only_case(_extend_adapter(**changes), EXTEND), expected)


def test_the_correct_independent_extend_layer_passes():
    case = _only_case(_extend_adapter(), EXTEND)
    assert case.status == "pass" and not case.diagnosis, case.reason


def test_a_variant_that_would_change_a_passing_selection_is_not_named():
    """Attention over a selection made without the causal mask, the right selection returned: the unmasked variant explains
    output and lse but also changes the indices the candidate got right, so it is not named."""
    def dsa_prefill(config, weights, hidden, start_positions):
        cfg, outputs, lses, indices = from_dict(config), [], [], []
        for row, start in zip(hidden, start_positions):
            positions = int(start) + np.arange(len(row))
            _, attended = _indexer_rows(cfg, weights, row, positions, {**CORRECT, "causal": False})
            _, selected = _indexer_rows(cfg, weights, row, positions, dict(CORRECT))
            chosen = [set(keys) for keys in attended]
            out, lse = slow.slow_mla(cfg, weights, row, positions, lambda i, j: j in chosen[i] and j <= i)  # MLA.8 still applies
            outputs.append(out), lses.append(lse), indices.append(_padded(selected, cfg.index_topk))
        return {"output": np.stack(outputs), "indices": np.array(indices), "lse": np.stack(lses)}
    case = _only_case(types.SimpleNamespace(dsa_prefill=dsa_prefill), PREFILL)
    assert sorted(c.name for c in case.comparisons if not c.passed) == ["lse", "output"], case.reason
    assert not any("no causal mask before the indexer's top-k" in text for text in case.diagnosis), case.diagnosis


# ------------------------------------------------------------------ FP8 checkpoints (FP8.4): weight_scale_inv read wrong

FP8_PREFILL = "mla.prefill.fp8/tiny-fp8/seed0"
E4M3FN = np.array([slow._e4m3fn(code) for code in range(256)])  # independent_mla's bit-by-bit decoder, one entry per code


def _dequantized(weights: dict, bug: str | None) -> dict:
    """Float weights from an FP8 checkpoint: decode(code[i, j]) * scale[i // 128, j // 128], with ``bug`` in the scale read."""
    suffix, out = "_scale_inv", {}
    for name, value in weights.items():
        if name.endswith(suffix):
            continue
        if name + suffix not in weights:
            out[name] = np.asarray(value, dtype=np.float64)
            continue
        codes, scales = np.asarray(value), np.asarray(weights[name + suffix], dtype=np.float64)
        rows, cols = np.arange(codes.shape[0]), np.arange(codes.shape[1])
        row_block, col_block = 128, 128
        if bug == "block_from_shapes":  # rows / scale rows, cols / scale cols (a partial edge block makes them differ from 128)
            row_block, col_block = -(-codes.shape[0] // scales.shape[0]), -(-codes.shape[1] // scales.shape[1])
        row_of = rows // row_block
        if bug == "edge_block_neighbour":  # the partial last row block reads the last full block's scale
            row_of = np.minimum(row_of, max(codes.shape[0] // 128 - 1, 0))
        scale = scales[row_of][:, cols // col_block]  # [rows, cols]
        scale = {"not_applied": np.ones_like(scale), "divided": 1.0 / scale,
                 "power_of_two": 2.0 ** np.floor(np.log2(scale))}.get(bug, scale)
        out[name] = E4M3FN[codes] * scale
    return out


def _fp8_prefill_adapter(bug: str | None) -> types.SimpleNamespace:
    def mla_prefill(config, weights, hidden, start_positions):
        cfg, floats = from_dict(config), _dequantized(weights, bug)
        rows = [slow.slow_mla(cfg, floats, row, int(start) + np.arange(len(row))) for row, start in zip(hidden, start_positions)]
        return {"output": np.stack([out for out, _ in rows]), "lse": np.stack([lse for _, lse in rows])}
    return types.SimpleNamespace(mla_prefill=mla_prefill)


FP8_WEIGHT_BUGS = {
    "not_applied": "FP8 weight_scale_inv not applied (the codes read as values)",
    "divided": "FP8 weight_scale_inv divided instead of multiplied",
    "block_from_shapes": "FP8 block size inferred from the shapes (rows / scale rows) instead of 128",
    "edge_block_neighbour": "FP8 edge block given its neighbour's scale (the last full block's)",
    "power_of_two": "FP8 weight scales truncated to powers of two",
}


@pytest.mark.parametrize("bug", list(FP8_WEIGHT_BUGS))
def test_fp8_weight_bug_is_named_from_outputs_alone(bug):
    _named_first(_only_case(_fp8_prefill_adapter(bug), FP8_PREFILL, "fp8"), FP8_WEIGHT_BUGS[bug])


def test_the_correct_independent_fp8_dequantisation_passes():
    case = _only_case(_fp8_prefill_adapter(None), FP8_PREFILL, "fp8")
    assert case.status == "pass" and not case.diagnosis, case.reason


# ------------------------------------------------------------------ FP8 latent cache records (FP8.11) read wrong

FP8_CORE = "mla.core.fp8/tiny-r512/bs16-seed0"


def _e4m3fnuz(byte: int) -> float:
    """One e4m3fnuz code: exponent bias 8, 0x80 the only NaN, no negative zero and no infinities."""
    if byte == 0x80:
        return math.nan
    sign, exponent, mantissa = -1.0 if byte & 0x80 else 1.0, (byte >> 3) & 0xF, byte & 0x7
    return sign * (math.ldexp(mantissa, -10) if exponent == 0 else math.ldexp(8 + mantissa, exponent - 11))


def _nearest_e4m3(values) -> list[float]:
    """``values`` rounded to the nearest finite e4m3fn value, saturating at +-448; a tie goes to the even code."""
    values = np.clip(np.asarray(values, dtype=np.float64), -448.0, 448.0)[:, None]
    codes = np.flatnonzero(np.isfinite(E4M3FN))
    distance = np.abs(E4M3FN[codes][None, :] - values)  # [values, finite codes]
    nearest = distance == distance.min(axis=1, keepdims=True)
    even = nearest & (codes % 2 == 0)[None, :]
    return E4M3FN[codes[np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1))]].tolist()


def _record_reader(bug: str | None):
    """independent_mla.slow_record_row (byte by byte: codes | float32 scales | bf16 rope) with ``bug`` in one field."""
    def read(record, head_dim_v: int) -> np.ndarray:
        raw, tiles = bytes(np.asarray(record, dtype=np.uint8).tolist()), head_dim_v // 128
        scales = list(struct.unpack_from(f"<{tiles}f", raw, head_dim_v))
        if bug == "scales_as_bf16":  # 2-byte scales at the scales' offset, each the top half of a float32
            scales = [struct.unpack("<f", b"\0\0" + raw[head_dim_v + 2 * k: head_dim_v + 2 * k + 2])[0] for k in range(tiles)]
        elif bug == "scales_after_rope":  # a [latent | rope | scales] layout: the scales are the last bytes
            scales = list(struct.unpack_from(f"<{tiles}f", raw, len(raw) - 4 * tiles))
        scales = {"scales_doubled": [2 * s for s in scales], "scales_reversed": scales[::-1]}.get(bug, scales)
        decode = _e4m3fnuz if bug == "codes_fnuz" else slow._e4m3fn
        latent = [decode(raw[i]) * scales[i // 128] for i in range(head_dim_v)]
        rope = [struct.unpack("<f", b"\0\0" + raw[k:k + 2])[0] for k in range(head_dim_v + 4 * tiles, len(raw), 2)]
        if bug == "rope_quantised":
            rope = _nearest_e4m3(rope)
        return np.array(latent + rope, dtype=np.float64)
    return read


def _fp8_core_adapter(bug: str | None) -> types.SimpleNamespace:
    def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(slow, "slow_record_row", _record_reader(bug))
            out, lse = slow.slow_latent_core(q, k_cache, block_table, cache_seqlens, int(head_dim_v), float(softmax_scale), bool(causal))
        return {"out": out, "lse": lse}
    return types.SimpleNamespace(latent_attention_core=latent_attention_core)


FP8_CACHE_BUGS = {
    "codes_fnuz": "FP8 cache codes read as e4m3fnuz",
    "scales_doubled": "FP8 cache scales doubled",
    "scales_as_bf16": "FP8 cache scales read as bf16",
    "scales_reversed": "FP8 cache scales applied in reverse order",
    "scales_after_rope": "FP8 cache scales read after the rope part",
    "rope_quantised": "FP8 cache rope part quantised to e4m3",
}


@pytest.mark.parametrize("bug", list(FP8_CACHE_BUGS))
def test_fp8_cache_record_bug_is_named_from_outputs_alone(bug):
    _named_first(_only_case(_fp8_core_adapter(bug), FP8_CORE), FP8_CACHE_BUGS[bug])


def test_the_correct_independent_record_reader_passes():
    case = _only_case(_fp8_core_adapter(None), FP8_CORE)
    assert case.status == "pass" and not case.diagnosis, case.reason
