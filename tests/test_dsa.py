"""DSA (spec/dsa.yaml): the indexer's steps against independent derivations, the top-k tie rule, sparse MLA equal to
dense MLA under the index mask, chunked prefill and decode through the SparseCache, the model end to end."""

from __future__ import annotations

import cmath
import re
import types

import numpy as np
import pytest

from conftest import attention_weights, hidden_states, preset, relative_error
from mla_ref import PagedLatentCache, Trace, mla_forward
from mla_ref import dsa as dsa_module
from mla_ref.cli import main
from mla_ref.conformance import reference_adapter
from mla_ref.conformance.check import check
from mla_ref.config import load_config
from mla_ref.dsa import (SparseCache, gather_selected_rows, hadamard_matrix, hadamard_rotate, index_scores, indexer_forward,
                         indexer_quantize, indexer_rope, select_top_k, selected_visibility)
from mla_ref.errors import CacheError, ConfigError
from mla_ref.fp8 import decode_fp8, encode_fp8
from mla_ref.model import ModelCache, greedy_generate, model_forward
from mla_ref.rope import apply_rope, rope_angles, rope_frequencies
from mla_ref.spec import evaluate_shape, load_steps, step_by_id
from mla_ref.weights import generate_weights

DENSE_FIELDS = {"index_n_heads": None, "index_head_dim": None, "index_topk": None}


def _dense(config):
    return config.replace(**DENSE_FIELDS)


def _without_indexer(weights: dict) -> dict:
    return {name: value for name, value in weights.items() if not name.startswith("indexer.")}


def test_hadamard_is_the_sylvester_recursion_and_orthonormal():
    h = np.array([[1.0]])
    for _ in range(7):
        h = np.block([[h, h], [h, -h]])  # H_2n = [[H, H], [H, -H]]
    assert np.array_equal(hadamard_matrix(128) * np.sqrt(128), h)
    assert np.allclose(hadamard_matrix(128) @ hadamard_matrix(128).T, np.eye(128), atol=1e-15)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 5, 128))
    assert np.allclose(hadamard_rotate(q) @ hadamard_rotate(k).T, q @ k.T, rtol=1e-13, atol=1e-13)


def test_indexer_rope_rotates_the_first_dims_in_the_half_layout():
    """Each pair (x[i], x[i + d/2]) is the complex number x[i] + j x[i + d/2] times e^(j pos freq_i); the rest is untouched."""
    config = preset("tiny-dsa")
    rope, width = config.qk_rope_head_dim, config.index_head_dim
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, config.index_n_heads, width))
    k = rng.standard_normal((1, 2, width))
    positions = np.array([[5, 3000]])
    q_rot, k_rot = indexer_rope(config, q, k, positions)
    freqs = rope_frequencies(config)
    for t, position in enumerate(positions[0]):
        for i in range(rope // 2):
            turn = cmath.exp(1j * position * freqs[i])
            expected = complex(k[0, t, i], k[0, t, i + rope // 2]) * turn
            assert abs(complex(k_rot[0, t, i], k_rot[0, t, i + rope // 2]) - expected) < 1e-12
            expected_q = complex(q[0, t, 2, i], q[0, t, 2, i + rope // 2]) * turn
            assert abs(complex(q_rot[0, t, 2, i], q_rot[0, t, 2, i + rope // 2]) - expected_q) < 1e-12
    assert np.array_equal(q_rot[..., rope:], q[..., rope:]) and np.array_equal(k_rot[..., rope:], k[..., rope:])


def test_index_scores_put_the_relu_before_the_signed_head_weights():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 3, 4, 8))
    k = rng.standard_normal((1, 5, 8))
    w = rng.standard_normal((1, 3, 4))
    assert (w < 0).any()
    expected = np.zeros((1, 3, 5))
    for t in range(3):
        for s in range(5):
            expected[0, t, s] = sum(w[0, t, h] * 8 ** -0.5 * max(float(q[0, t, h] @ k[0, s]), 0.0) for h in range(4))
    assert np.allclose(index_scores(q, k, w), expected, rtol=1e-13, atol=1e-13)


def test_top_k_ties_rank_the_lower_position_first_and_pad_with_minus_one():
    scores = np.array([[[1.0, 3.0, 3.0, 2.0, 3.0, -np.inf, -np.inf]]])
    assert select_top_k(scores, 2).tolist() == [[[1, 2]]]
    assert select_top_k(scores, 4).tolist() == [[[1, 2, 4, 3]]]
    assert select_top_k(scores, 7).tolist() == [[[1, 2, 4, 3, 0, -1, -1]]]  # 5 visible keys, k = 7
    assert select_top_k(np.full((1, 1, 3), -np.inf), 2).tolist() == [[[-1, -1]]]  # a padding query selects nothing


def test_minus_one_never_gathers_the_last_row():
    rows = np.arange(12.0).reshape(1, 4, 3)
    gathered, valid = gather_selected_rows(rows, np.array([[[3, -1]]]))
    assert valid.tolist() == [[[True, False]]] and gathered[0, 0, 1].tolist() == [0.0, 0.0, 0.0]
    assert selected_visibility(np.array([[[3, -1]]]), 4).tolist() == [[[False, False, False, True]]]


@pytest.fixture(scope="module")
def tiny_dsa():
    config = preset("tiny-dsa")
    return config, attention_weights("tiny-dsa", seed=3)


def test_selection_is_causal_and_keeps_min_k_visible(tiny_dsa):
    config, weights = tiny_dsa
    hidden = hidden_states(config, 2, 40, 4)
    result = indexer_forward(config, weights, hidden)
    assert result.indices.shape == (2, 40, 8)
    for t in range(40):
        chosen = result.indices[:, t]
        assert ((chosen >= 0).sum(axis=-1) == min(8, t + 1)).all() and (chosen <= t).all()
    changed = hidden.copy()
    changed[:, 30:] += 1.0  # later tokens may not move what earlier queries select
    again = indexer_forward(config, weights, changed)
    assert np.array_equal(again.indices[:, :30], result.indices[:, :30])
    assert np.array_equal(again.scores[:, :30], result.scores[:, :30])


def test_a_token_moves_its_own_score_row_and_column_only_with_fp8_too(tiny_dsa):
    """The premise of the GC-DSA builder (cases._sequences_with_selection_margins scores only the queries that select): row t
    of the index scores depends on token t and the earlier keys alone, with DSA.6's FP8 (per token, per (token, head)) as without."""
    config, weights = tiny_dsa
    hidden = hidden_states(config, 1, 20, 6)
    changed = hidden.copy()
    changed[:, 12] += 1.0
    own_row_and_column = np.zeros((1, 20, 20), bool)
    own_row_and_column[:, 12, :] = own_row_and_column[:, :, 12] = True
    for quantize in (False, True):
        moved = indexer_forward(config, weights, changed, quantize=quantize).scores != indexer_forward(config, weights, hidden, quantize=quantize).scores
        assert moved[0, 12, :13].any() and moved[0, 13:, 12].any() and not (moved & ~own_row_and_column).any(), quantize


def test_selection_is_the_top_of_the_visible_scores(tiny_dsa):
    config, weights = tiny_dsa
    result = indexer_forward(config, weights, hidden_states(config, 1, 40, 5))
    for t in range(8, 40):
        row = result.scores[0, t, : t + 1]
        chosen = set(result.indices[0, t].tolist())
        assert min(row[list(chosen)]) > max(np.delete(row, list(chosen)))  # every selected score beats every dropped one


def test_hadamard_changes_float64_scores_only_by_rounding():
    rng = np.random.default_rng(7)
    q, k, w = rng.standard_normal((1, 12, 3, 128)), rng.standard_normal((1, 12, 128)), rng.standard_normal((1, 12, 3))
    assert relative_error(index_scores(hadamard_rotate(q), hadamard_rotate(k), w), index_scores(q, k, w)) < 1e-13
    assert relative_error(index_scores(hadamard_rotate(q), k, w), index_scores(q, k, w)) > 0.1  # on one side only: scrambled


def test_fp8_indexer_uses_power_of_two_scales_and_stays_close(tiny_dsa):
    config, weights = tiny_dsa
    hidden = hidden_states(config, 1, 40, 10)
    q = np.random.default_rng(11).standard_normal((1, 4, 3, 128))
    k = np.random.default_rng(12).standard_normal((1, 4, 128))
    q_hat, k_hat = indexer_quantize(q, k, True)
    assert not np.array_equal(q_hat, q) and relative_error(q_hat, q) < 0.07 and relative_error(k_hat, k) < 0.07
    for x, x_hat in ((q, q_hat), (k, k_hat)):  # per 128-wide row: e4m3 values times 2^ceil(log2(amax / 448))
        exponent = np.ceil(np.log2(np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-4) / 448))
        on_grid = x_hat / 2.0 ** exponent
        assert np.array_equal(decode_fp8(encode_fp8(on_grid)), on_grid)
    exact = indexer_forward(config, weights, hidden)
    fp8 = indexer_forward(config, weights, hidden, quantize=True)
    finite = np.isfinite(exact.scores)
    assert np.array_equal(finite, np.isfinite(fp8.scores))
    assert relative_error(fp8.scores[finite], exact.scores[finite]) < 0.1
    output = mla_forward(config, weights, hidden, indexer_fp8=True).output
    assert np.isfinite(output).all()


def test_sparse_absorbed_equals_dense_mla_under_the_index_mask(tiny_dsa):
    config, weights = tiny_dsa
    hidden = hidden_states(config, 2, 40, 13)
    naive = mla_forward(config, weights, hidden)  # MLA.6-MLA.11 with the index mask
    absorbed = mla_forward(config, weights, hidden, attention="absorbed")  # DSA.11-DSA.12 over gathered rows
    assert relative_error(absorbed.output, naive.output) < 1e-13
    assert np.allclose(absorbed.lse, naive.lse, rtol=1e-13, atol=1e-13)
    dense = mla_forward(_dense(config), _without_indexer(weights), hidden)
    assert np.array_equal(naive.output[:, :8], dense.output[:, :8])  # up to 8 visible keys: every key kept
    assert relative_error(naive.output[:, 8:], dense.output[:, 8:]) > 1e-3  # then sparsity shows


def test_k_above_the_visible_keys_is_dense_mla():
    config = preset("tiny-dsa-wide")
    weights = attention_weights("tiny-dsa-wide", seed=3)
    hidden = hidden_states(config, 2, 40, 14)
    dense = mla_forward(_dense(config), _without_indexer(weights), hidden)
    assert np.array_equal(mla_forward(config, weights, hidden).output, dense.output)


@pytest.mark.parametrize("paged", [False, True])
def test_chunked_prefill_and_decode_equal_one_prefill(tiny_dsa, paged):
    config, weights = tiny_dsa
    hidden = hidden_states(config, 2, 40, 15)
    whole = mla_forward(config, weights, hidden)
    latent = PagedLatentCache.empty(config, 2, 40, block_size=4, shuffle_seed=1) if paged else None
    cache = SparseCache.empty(config, 2, latent=latent)
    outputs = []
    for begin, end in [(0, 5), (5, 23), (23, 24), (24, 25), (25, 40)]:  # chunks on a cached prefix (bottom-right), decodes
        step = mla_forward(config, weights, hidden[:, begin:end], cache=cache)
        cache = step.cache
        outputs.append(step.output)
    assert relative_error(np.concatenate(outputs, axis=1), whole.output) < 1e-13
    assert cache.index_key_rows().shape == (2, 40, config.index_head_dim)


def test_padding_queries_select_nothing_and_are_not_cached(tiny_dsa):
    config, weights = tiny_dsa
    hidden = hidden_states(config, 2, 12, 16)
    result = mla_forward(config, weights, hidden, cache=SparseCache.empty(config, 2), query_lengths=[12, 7])
    assert result.cache.lengths.tolist() == [12, 7] and np.array_equal(result.output[1, 7:], np.zeros((5, config.hidden_size)))
    alone = mla_forward(config, weights, hidden[1:, :7])
    assert relative_error(result.output[1, :7], alone.output[0]) < 1e-13


def test_trace_records_every_dsa_step_with_its_declared_shape(tiny_dsa):
    config, weights = tiny_dsa
    prefix, seq, batch = 9, 3, 2
    hidden = hidden_states(config, batch, prefix + seq, 17)
    recorded = {}
    for attention in ("naive", "absorbed"):
        cache = mla_forward(config, weights, hidden[:, :prefix], cache=SparseCache.empty(config, batch)).cache
        trace = Trace()
        mla_forward(config, weights, hidden[:, prefix:], cache=cache, attention=attention, trace=trace)
        recorded.update({step: trace[step] for step in trace.steps if step.startswith("DSA.")})
    keys = prefix + seq
    symbols = {**config.symbols(), "batch": batch, "seq": seq, "keys": keys, "selected": min(config.index_topk, keys)}
    for step in load_steps("dsa.yaml"):
        if step["id"] == "DSA.7" or not step["function"].startswith("mla_ref.dsa."):  # the cache append has no array output;
            continue  # the kernel contracts (mla_ref.dsa_kernel) are not layer steps
        assert step["id"] in recorded, step["id"]
        for name, shape in step["outputs"].items():
            expected = evaluate_shape(shape.replace("...", "batch, seq, index_n_heads"), symbols)
            assert recorded[step["id"]][name].shape == expected, (step["id"], name)


def test_config_rule_r10():
    config = preset("tiny-dsa")
    with pytest.raises(ConfigError, match="CONFIG.R10"):
        config.replace(index_topk=None)
    with pytest.raises(ConfigError, match="power of two"):
        config.replace(index_head_dim=96)
    with pytest.raises(ConfigError, match="power of two"):
        config.replace(index_head_dim=16)  # narrower than qk_rope_head_dim = 32
    assert load_config("deepseek-v3.2").index_topk == 2048


def test_dsa_needs_a_sparse_cache(tiny_dsa):
    config, weights = tiny_dsa
    hidden = hidden_states(config, 1, 3, 18)
    from mla_ref import LatentCache, NaiveCache
    for cache in (LatentCache.empty(config, 1), NaiveCache.empty(config, 1)):
        with pytest.raises(CacheError, match="SparseCache"):
            mla_forward(config, weights, hidden, cache=cache)
    with pytest.raises(CacheError, match="naive"):
        ModelCache.empty(config, 1, kind="naive")
    dense = _dense(config)
    with pytest.raises(CacheError):
        mla_forward(dense, _without_indexer(weights), hidden, cache=SparseCache.empty(config, 1))


@pytest.fixture(scope="module")
def tiny_dsa_model():
    config = preset("tiny-dsa")
    return config, generate_weights(config, seed=0)


def test_cached_greedy_decode_past_k_equals_full_recomputation(tiny_dsa_model):
    config, weights = tiny_dsa_model
    prompt = [5, 17, 42, 3, 88, 1]
    generated = greedy_generate(config, weights, [prompt], 10)  # visible keys reach 15 > index_topk = 8
    sequence = prompt + generated.tokens[0].tolist()
    full = model_forward(config, weights, np.array([sequence[:-1]]))
    for step in range(10):
        assert relative_error(generated.logits[0, step], full.logits[0, len(prompt) - 1 + step]) < 1e-12
    assert len(sequence) - 1 > config.index_topk


@pytest.mark.slow
def test_the_v32_preset_runs_end_to_end_on_a_short_sequence():
    """The V3.2 preset's attention shapes; the stack shortened to one dense layer and a small vocabulary so it fits a test."""
    config = load_config("deepseek-v3.2").replace(num_hidden_layers=1, first_k_dense_replace=1, vocab_size=64,
                                                  intermediate_size=256, num_nextn_predict_layers=0)
    weights = generate_weights(config, seed=0)
    result = model_forward(config, weights, np.array([[1, 2, 3, 4]]))
    assert result.logits.shape == (1, 4, 64) and np.isfinite(result.logits).all()


@pytest.mark.parametrize("step", [step["id"] for step in load_steps("dsa.yaml")])
def test_explain_every_dsa_step(step, capsys):
    assert main(["explain", step, "--preset", "deepseek-v3.2"]) == 0
    text = capsys.readouterr().out
    module = step_by_id(step)["function"].split(".")[1]  # dsa, or dsa_kernel for the FlashMLA contracts
    assert text.startswith(step + " ") and f"mla_ref/{module}.py:" in text and "pitfalls:" in text


def _interleaved_indexer_rope(config, q_index, k_index, positions, table_dtype=np.float64):
    """The classic bug: the indexer rotated in MLA's interleaved layout (EXP before 8631a81)."""
    rope = config.qk_rope_head_dim
    cos, sin = rope_angles(config, positions, q_index.dtype, table_dtype)
    q, k = q_index.copy(), k_index.copy()
    q[..., :rope] = apply_rope(q_index[..., :rope], cos[:, :, None, :], sin[:, :, None, :], "interleaved")
    k[..., :rope] = apply_rope(k_index[..., :rope], cos, sin, "interleaved")
    return q, k


@pytest.mark.slow
def test_the_checker_rejects_interleaved_indexer_rope_and_dense_attention(monkeypatch):
    assert check(types.SimpleNamespace(dsa_indexer=reference_adapter.dsa_indexer), "fp32", "dsa.indexer/").ok
    with monkeypatch.context() as patched:
        patched.setattr(dsa_module, "indexer_rope", _interleaved_indexer_rope)
        report = check(types.SimpleNamespace(dsa_indexer=reference_adapter.dsa_indexer), "fp32", "dsa.indexer/")
    assert report.cases[0].status == "fail" and "indices" in report.cases[0].reason, report.cases[0].reason

    def dense(config, weights, hidden, start_positions):
        return reference_adapter.mla_prefill({**config, **DENSE_FIELDS}, _without_indexer(weights), hidden, start_positions)
    assert check(types.SimpleNamespace(dsa_prefill=dense), "fp32", "dsa.prefill/").cases[0].status == "fail"


class _ScoreTrace(Trace):
    """Keeps every layer's masked index scores (DSA.9): Trace keeps only the last call of a step."""

    def __init__(self) -> None:
        super().__init__()
        self.masked_scores: list[np.ndarray] = []

    def record(self, step_id: str, **arrays: np.ndarray) -> None:
        super().record(step_id, **arrays)
        if step_id == "DSA.9":
            self.masked_scores.append(np.asarray(arrays["masked_scores"]))


def _fed_sequences(case_id: str) -> tuple[dict, dict, list[np.ndarray]]:
    """The committed case's config, weights and the token sequences its reference run feeds the model (for a greedy decode:
    the prompt and every generated token but the last)."""
    from pathlib import Path
    from mla_ref.conformance.check import load_case
    from mla_ref.golden.manifest import read_manifest
    golden = Path(__file__).resolve().parents[1] / "golden"
    entry = read_manifest(golden / "manifest.yaml")["cases"][case_id]
    case = load_case(golden, entry)
    inputs = case["input"]
    if "prompt_tokens" in inputs:
        generated = case["output"]["tokens"]
        sequences = [np.concatenate([row[:length], generated[b, :-1]]) for b, (row, length)
                     in enumerate(zip(inputs["prompt_tokens"], inputs["prompt_lengths"]))]
    else:
        sequences = [row[:length] for row, length in zip(inputs["tokens"], inputs["query_lengths"])]
    return entry["config"], case["weight"], sequences


@pytest.mark.parametrize("case_id", ["dsa.logits/tiny-dsa/seed0", "dsa.greedy/tiny-dsa/seed0"])
def test_model_level_dsa_cases_select_the_same_keys_under_any_tie_rule(case_id):
    """spec/dsa.yaml conventions.ties: the golden inputs keep a gap at the k-th score, so lower-first and higher-first tie
    rules select the same sets, with a relative gap of at least 0.05 (an earlier dsa.greedy had four keys at exactly 0.0
    competing for the last two slots, and torch.topk chose another pair)."""
    config, weights, sequences = _fed_sequences(case_id)
    k = config["index_topk"]
    for tokens in sequences:
        trace = _ScoreTrace()
        model_forward(load_config(config), weights, tokens[None], trace=trace)
        assert len(trace.masked_scores) == config["num_hidden_layers"]
        for scores in trace.masked_scores:
            for row in scores.reshape(-1, scores.shape[-1]):
                visible = row[np.isfinite(row)]
                if visible.size <= k:
                    continue
                lower_first = set(sorted(range(row.size), key=lambda s: (-row[s], s))[:k])
                higher_first = set(sorted(range(row.size), key=lambda s: (-row[s], -s))[:k])
                assert lower_first == higher_first
                ranked = np.sort(visible)[::-1]
                assert (ranked[k - 1] - ranked[k]) / np.abs(visible).max() > 0.05


def test_the_fp8_profile_emulates_the_indexer_fp8_and_the_truth_does_not(tiny_dsa):
    """spec/tolerance.yaml fp8 (indexer_fp8): the emulation's DSA.6 keys are e4m3 values times a power of two per token
    (exactly bf16, so the profile's storage rounding keeps them); the bf16 emulation's and the float64 truth's are not."""
    config, weights = tiny_dsa
    hidden = hidden_states(config, 1, 12, 21)

    def keys_on_fp8_grid(k_hat):
        exponent = np.ceil(np.log2(np.maximum(np.abs(k_hat).max(axis=-1, keepdims=True), 1e-4) / 448))
        on_grid = k_hat / 2.0 ** exponent
        return np.array_equal(decode_fp8(encode_fp8(on_grid)), on_grid)
    traces = {profile: Trace(profile) for profile in ("fp8", "bf16")}
    for trace in traces.values():
        indexer_forward(config, weights, hidden, trace=trace)
    assert traces["fp8"].indexer_fp8 and not traces["bf16"].indexer_fp8
    assert keys_on_fp8_grid(traces["fp8"]["DSA.6"]["k_hat"])
    assert not keys_on_fp8_grid(traces["bf16"]["DSA.6"]["k_hat"])
    assert not keys_on_fp8_grid(indexer_forward(config, weights, hidden).index_keys)
    layer = Trace("fp8")
    mla_forward(config, weights, hidden, attention="absorbed", cache=SparseCache.empty(config, 1), trace=layer)
    assert keys_on_fp8_grid(layer["DSA.6"]["k_hat"])


def test_info_and_explain_show_the_v32_dsa_fields(capsys):
    """`mla-ref info deepseek-v3.2` (also `python -m mla_ref`, the same main) lists the indexer fields of V3.2's config.json (facts A1: 64 heads x 128,
    index_topk 2048) and their derived scales; a dense preset has no DSA section; explain sizes DSA.10 with that topk."""
    assert main(["info", "deepseek-v3.2"]) == 0
    shown = capsys.readouterr().out
    section = shown.split("sparse attention, DSA (spec/dsa.yaml)\n", 1)[1].split("\n\n", 1)[0]
    assert "64 x 128" in section and re.search(r"index_topk +2048 ", section)
    assert repr(128 ** -0.5) in section and repr(64 ** -0.5) in section
    assert main(["info", "tiny"]) == 0 and "DSA" not in capsys.readouterr().out
    assert main(["explain", "DSA.10"]) == 0  # the V3.2 preset by default for a DSA step
    assert "selected 2048)" in capsys.readouterr().out
