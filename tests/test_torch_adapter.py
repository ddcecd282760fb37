"""examples/torch_adapter.py in float64 equals the reference, and every mutant of tests/mutants/ changes its behaviour.

Skipped without PyTorch; CI runs them in the step that installs it (``pytest -m slow``; locally ``pytest -m torch``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mla_ref.balance import bias_update, expert_load, sequence_balance_loss, v2_balance_losses  # noqa: E402
from mla_ref.cache import LatentCache  # noqa: E402
from mla_ref.config import load_preset  # noqa: E402
from mla_ref.dispatch import dispatch_plan  # noqa: E402
from mla_ref.fp8_cache import encode_latent_record, record_width  # noqa: E402
from mla_ref.dsa import SparseCache, indexer_forward  # noqa: E402
from mla_ref.dsa_cache import paged_index_logits, write_index_key_pages  # noqa: E402
from mla_ref.fp8 import act_quant  # noqa: E402
from mla_ref.precision import round_bf16  # noqa: E402
from mla_ref.conformance.check import load_case  # noqa: E402
from mla_ref.conformance.protocol import call, entry_points  # noqa: E402
from mla_ref.golden.generate import default_golden_dir  # noqa: E402
from mla_ref.golden.manifest import read_manifest  # noqa: E402
from mla_ref.mla import latent_attention_core, mla_forward  # noqa: E402
from mla_ref.moe import ffn_forward, route  # noqa: E402
from mla_ref.rope import softmax_scale  # noqa: E402
from mla_ref.trace import Trace  # noqa: E402
from mla_ref.weights import attention_weights_for_half_layout, generate_attention_weights, generate_weights, subtree  # noqa: E402
from mutants import mutate  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # slow: the CI step that installs torch runs `pytest -m slow`

RTOL = 1e-10
MLA_PRESETS = ["tiny", "tiny-yarn", "tiny-v2lite", "tiny-v2", "tiny-mscale-mismatch"]


@functools.lru_cache(maxsize=None)
def adapter(dtype: str = "float64"):
    torch.set_num_threads(1)  # tiny tensors: thread start-up costs more than it saves
    return mutate.load(None, dtype)


def assert_close(actual, expected, name: str, rtol: float = RTOL) -> None:
    """Same shape, same inf / NaN positions, finite values within ``rtol`` of the largest |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg=f"{name}: finite positions differ")
    np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=f"{name}: inf values differ")
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-300)
    worst = float(np.abs(actual[finite] - expected[finite]).max(initial=0.0))
    assert worst <= rtol * scale, f"{name}: max |diff| {worst:.3e} > {rtol} x {scale:.3e}"


def assert_steps_match(produced: dict, trace: Trace) -> int:
    """Every ``STEP/name`` intermediate the adapter returns equals the reference's; returns how many were compared."""
    compared = 0
    for key, value in produced.items():
        if "/" not in key:
            continue
        step, name = key.split("/")
        assert step in trace and name in trace[step], f"adapter returns {key}, which the reference never records"
        assert_close(value, trace[step][name], key)
        compared += 1
    return compared


def mla_weights(name: str, seed: int = 0) -> dict:
    return generate_attention_weights(load_preset(name), seed=seed)


def far_positions(config) -> list[int]:
    """Start positions across and beyond the original context when the preset allows them."""
    return [4090, 70000] if config.max_position_embeddings > 70016 else [0, 3000]


# ------------------------------------------------------------------------------ MLA


@pytest.mark.parametrize("name", MLA_PRESETS)
def test_prefill_matches_reference(name):
    config = load_preset(name)
    weights = mla_weights(name)
    hidden = 2.0 * np.random.default_rng(1).standard_normal((2, 11, config.hidden_size))
    starts = np.array(far_positions(config))
    trace = Trace()
    expected = mla_forward(config, weights, hidden, starts, trace=trace)
    produced = adapter().mla_prefill(config.to_dict(), weights, hidden, starts)
    assert_close(produced["output"], expected.output, "output")
    assert_close(produced["lse"], expected.lse, "lse")
    assert assert_steps_match(produced, trace) >= 8


def cache_and_chunk(config, prefix: list[int], query_lengths: list[int], seq: int, seed: int = 2):
    """Random latent rows for cached prefixes (0 past each length) and a chunk whose padding holds random values too."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((len(prefix), max(prefix) + 3, config.latent_cache_width))
    rows[np.arange(rows.shape[1])[None, :] >= np.array(prefix)[:, None]] = 0.0
    hidden = 2.0 * rng.standard_normal((len(prefix), seq, config.hidden_size))
    return rows, np.array(prefix), np.array(query_lengths), hidden


@pytest.mark.parametrize("name", MLA_PRESETS)
@pytest.mark.parametrize("shape", ["decode", "chunk"])
def test_extend_matches_reference(name, shape):
    config = load_preset(name)
    weights = mla_weights(name)
    if shape == "decode":
        prefix = [5, 0, 17] if config.max_position_embeddings <= 4096 else [4100, 0, 6000]
        rows, cached, new, hidden = cache_and_chunk(config, prefix, [1, 1, 1], 1)
    else:
        rows, cached, new, hidden = cache_and_chunk(config, [0, 7, 23], [9, 4, 6], 9)
    trace = Trace()
    expected = mla_forward(config, weights, hidden, cache=LatentCache(rows, cached), attention="absorbed",
                           query_lengths=new, trace=trace)
    produced = adapter().mla_extend(config.to_dict(), weights, hidden, rows, cached, new)
    assert_close(produced["output"], expected.output, "output")
    assert_close(produced["lse"], expected.lse, "lse")
    written = np.arange(hidden.shape[1])[None, :] < new[:, None]
    positions = np.minimum(cached[:, None] + np.arange(hidden.shape[1]), expected.cache.rows.shape[1] - 1)
    expected_rows = np.where(written[..., None], expected.cache.rows[np.arange(len(cached))[:, None], positions], 0.0)
    assert_close(produced["rows"], expected_rows, "rows")
    assert assert_steps_match(produced, trace) >= 8


def paged_cache(config, seqlens: list[int], block_size: int, s_q: int, seed: int = 3):
    """Shuffled pages, NaN in every unused slot and spare block, q [batch, s_q, heads, width]."""
    rng = np.random.default_rng(seed)
    width = config.latent_cache_width
    per_sequence = [-(-n // block_size) for n in seqlens]
    num_blocks = sum(per_sequence) + 2
    cache = np.full((num_blocks, block_size, 1, width), np.nan)
    table = np.full((len(seqlens), max(max(per_sequence), 1) + 1), -1, np.int64)
    free = list(rng.permutation(num_blocks))
    for b, (n, blocks) in enumerate(zip(seqlens, per_sequence)):
        for k in range(blocks):
            table[b, k] = block = free.pop()
            used = min(block_size, n - k * block_size)
            cache[block, :used, 0] = rng.standard_normal((used, width))
    q = 3.0 * rng.standard_normal((len(seqlens), s_q, config.num_attention_heads, width))
    return q, cache, table, np.array(seqlens)


@pytest.mark.parametrize("seqlens, block_size, s_q, causal", [
    ([0, 5, 13], 1, 1, False), ([17, 40, 3], 16, 1, False), ([70, 1, 130], 64, 1, False),
    ([9, 21, 4], 16, 2, True), ([6, 33, 3], 16, 4, True)])
def test_latent_attention_core_matches_reference(seqlens, block_size, s_q, causal):
    config = load_preset("tiny-yarn")
    q, cache, table, lengths = paged_cache(config, seqlens, block_size, s_q)
    scale = softmax_scale(config)
    trace = Trace()
    out, lse = latent_attention_core(q, cache, table, lengths, config.kv_lora_rank, scale, causal, trace=trace)
    produced = adapter().latent_attention_core(q, cache, table, lengths, config.kv_lora_rank, scale, causal)
    assert_close(produced["out"], out, "out")
    assert_close(produced["lse"], lse, "lse")
    assert assert_steps_match(produced, trace) >= 4


@pytest.mark.parametrize("scale_rule", ["ue8m0", "amax", "flt_min"])
def test_latent_attention_core_reads_fp8_records_as_the_reference(scale_rule):
    """FlashMLA's FP8 cache (FP8.12): the records decoded with torch's float8_e4m3fn view (float64 mode: exact products)."""
    config = load_preset("tiny").replace(kv_lora_rank=256)
    q, cache, table, lengths = paged_cache(config, [5, 19, 0], 16, 1)
    held = np.isfinite(cache).all(axis=-1)  # [num_blocks, block_size, 1]
    records = np.full(cache.shape[:3] + (record_width(256, config.qk_rope_head_dim),), 0x7F, np.uint8)  # NaN bytes unused
    records[held] = encode_latent_record(cache[held][:, :256], cache[held][:, 256:], scale_rule)
    trace = Trace()
    out, lse = latent_attention_core(q, records, table, lengths, 256, 0.1, False, trace=trace)
    produced = adapter().latent_attention_core(q, records, table, lengths, 256, 0.1, False)
    assert_close(produced["out"], out, "out")
    assert_close(produced["lse"], lse, "lse")
    assert np.array_equal(produced["MLA.19/key_rows"], trace["MLA.19"]["key_rows"])
    assert np.array_equal(produced["FP8.11/rows"], trace["FP8.11"]["rows"])


@pytest.mark.parametrize("changes", [
    {"rope_layout": "half"}, {"yarn_truncate": False}, {"beta_fast": 1.0, "beta_slow": 1.0},
    {"yarn_activation": "max_seq_len", "max_seq_len": 4096}, {"mscale_all_dim": 0.0}, {"rms_norm_eps": 1e-5}])
def test_prefill_follows_config_options(changes):
    config = load_preset("tiny-yarn").replace(**changes)
    weights = mla_weights("tiny-yarn")
    if config.rope_layout == "half":
        weights = attention_weights_for_half_layout(config, weights)
    hidden = np.random.default_rng(4).standard_normal((2, 7, config.hidden_size))
    starts = np.array([5000, 90000])
    expected = mla_forward(config, weights, hidden, starts)
    produced = adapter().mla_prefill(config.to_dict(), weights, hidden, starts)
    assert_close(produced["output"], expected.output, "output")


# ------------------------------------------------------------------------------ DSA (DeepSeek-V3.2 sparse attention)


def test_dsa_indexer_and_prefill_match_reference():
    config = load_preset("tiny-dsa")
    weights = mla_weights("tiny-dsa")
    hidden = 2.0 * np.random.default_rng(10).standard_normal((2, 19, config.hidden_size))
    starts = np.array([0, 5000])
    trace = Trace()
    expected = indexer_forward(config, weights, hidden, starts, trace=trace)
    produced = adapter().dsa_indexer(config.to_dict(), weights, hidden, starts)
    np.testing.assert_array_equal(produced["indices"], expected.indices)
    assert_close(produced["scores"], expected.scores, "scores")
    assert assert_steps_match(produced, trace) >= 9
    trace = Trace()
    expected = mla_forward(config, weights, hidden, starts, trace=trace)
    produced = adapter().dsa_prefill(config.to_dict(), weights, hidden, starts)
    np.testing.assert_array_equal(produced["indices"], expected.indices)
    assert_close(produced["output"], expected.output, "output")
    produced.pop("MLA.9/logits")  # the reference zeroes the keys no query selected before MLA.9 (masked out by MLA.10 anyway)
    assert assert_steps_match(produced, trace) >= 15


@pytest.mark.parametrize("prefix, query_lengths, seq", [([30, 5, 0], [1, 1, 1], 1), ([0, 7, 23], [9, 4, 6], 9)])
def test_dsa_extend_matches_reference(prefix, query_lengths, seq):
    config = load_preset("tiny-dsa")
    weights = mla_weights("tiny-dsa")
    rows, cached, new, hidden = cache_and_chunk(config, prefix, query_lengths, seq)
    index_rows = np.random.default_rng(11).standard_normal(rows.shape[:2] + (config.index_head_dim,))
    index_rows[np.arange(rows.shape[1])[None, :] >= cached[:, None]] = 0.0
    trace = Trace()
    cache = SparseCache(LatentCache(rows, cached), LatentCache(index_rows, cached))
    expected = mla_forward(config, weights, hidden, cache=cache, attention="absorbed", query_lengths=new, trace=trace)
    produced = adapter().dsa_extend(config.to_dict(), weights, hidden, rows, index_rows, cached, new)
    np.testing.assert_array_equal(produced["indices"], expected.indices)
    assert_close(produced["output"], expected.output, "output")
    assert_close(produced["lse"], expected.lse, "lse")
    assert assert_steps_match(produced, trace) >= 15


# ------------------------------------------------------------------------------ MoE


@pytest.mark.parametrize("scale_rule", ["ue8m0", "plain"])
def test_index_cache_writer_and_logits_match_reference(scale_rule):
    """DSA.16 byte for byte (scales from 2^-12 to 2^10 times a normal draw, a zero key, a skipped token) and DSA.18 in fp32."""
    rng = np.random.default_rng(5)
    keys = round_bf16(rng.standard_normal((13, 128)) * 2.0 ** rng.uniform(-12, 10, size=(13, 1)))
    keys[4] = 0.0
    slots = np.append(rng.permutation(16)[:12], -1)
    pages = np.full((4, 4, 1, 132), 0xFF, np.uint8)
    written = adapter("float32").index_cache_write(keys, pages, slots, scale_rule)["k_cache"]
    assert np.array_equal(written, write_index_key_pages(pages, keys, slots, scale_rule))
    full = write_index_key_pages(pages, np.concatenate([keys[:12], keys[:4]]), np.arange(16), scale_rule)
    q_codes, _ = act_quant(rng.standard_normal((2, 3, 3, 128)), "ue8m0")
    weights = rng.standard_normal((2, 3, 3)).astype(np.float32).astype(np.float64)
    args = (q_codes, full, weights, np.array([11, 3]), np.array([[3, 0, 2], [1, -1, -1]]))
    produced, expected = adapter("float32").index_logits_paged(*args)["logits"], paged_index_logits(*args)
    assert_close(produced, expected, "logits", rtol=1e-5)  # -inf past each query's position, NaN bytes never read


def moe_weights(config, layer: int, bias_shift: float = -0.6) -> dict:
    weights = subtree(generate_weights(config, seed=0), f"model.layers.{layer}.")
    if "mlp.gate.e_score_correction_bias" in weights:
        weights["mlp.gate.e_score_correction_bias"] = weights["mlp.gate.e_score_correction_bias"] + bias_shift
    return weights


@pytest.mark.parametrize("name", ["tiny", "tiny-v2", "tiny-v2lite", "tiny-mscale-mismatch"])
@pytest.mark.parametrize("changes", [{}, {"group_mask_fill": "zero"}, {"topk_norm_rule": "sigmoid_only", "topk_norm_epsilon": 1e-20}])
def test_route_matches_reference(name, changes):
    config = load_preset(name).replace(**changes)
    layer = config.moe_layers[0]
    weights = {k: v for k, v in moe_weights(config, layer).items() if k.startswith("mlp.gate.")}
    hidden = np.random.default_rng(5).standard_normal((32, config.hidden_size))
    trace = Trace()
    expected = route(config, weights, hidden, trace=trace)
    produced = adapter().moe_route(config.to_dict(), weights, hidden)
    np.testing.assert_array_equal(produced["expert_ids"], expected.expert_ids)
    assert_close(produced["weights"], expected.weights, "weights")
    assert assert_steps_match(produced, trace) >= 6


def test_route_breaks_ties_to_the_lower_index():
    config = load_preset("tiny")
    weights = {k: v for k, v in moe_weights(config, 1, bias_shift=0.0).items() if k.startswith("mlp.gate.")}
    gate = weights["mlp.gate.weight"].copy()
    gate[[1, 2, 5]] = gate[0]  # four equal experts: two inside group 0, one in group 1
    weights["mlp.gate.weight"] = gate
    weights["mlp.gate.e_score_correction_bias"] = np.zeros(config.n_routed_experts)
    hidden = np.random.default_rng(6).standard_normal((16, config.hidden_size))
    expected = route(config, weights, hidden)
    produced = adapter().moe_route(config.to_dict(), weights, hidden)
    np.testing.assert_array_equal(produced["expert_ids"], expected.expert_ids)


@pytest.mark.parametrize("name, layer", [("tiny", 0), ("tiny", 1), ("tiny-v2", 1), ("tiny-v2lite", 1), ("tiny-mscale-mismatch", 0)])
def test_moe_layer_matches_reference(name, layer):
    config = load_preset(name)
    weights = moe_weights(config, layer)
    hidden = np.random.default_rng(7).standard_normal((3, 5, config.hidden_size))
    trace = Trace()
    expected = ffn_forward(config, weights, hidden, layer, trace=trace)
    produced = adapter().moe_layer(config.to_dict(), weights, hidden, layer)
    assert_close(produced["output"], expected.output, "output")
    if expected.routing is not None:
        np.testing.assert_array_equal(produced["expert_ids"], expected.routing.expert_ids)
        assert assert_steps_match(produced, trace) >= 6


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_training_rules_and_dispatch_match_reference(name):
    config = load_preset(name).replace(topk_method="noaux_tc", scoring_func="sigmoid")
    weights = {k: v for k, v in moe_weights(config, 1).items() if k.startswith("mlp.gate.")}
    if "mlp.gate.e_score_correction_bias" not in weights:
        weights["mlp.gate.e_score_correction_bias"] = np.zeros(config.n_routed_experts)
    hidden = np.random.default_rng(9).standard_normal((3 * 10, config.hidden_size))
    routing = route(config, weights, hidden)
    scores, ids = routing.scores.reshape(3, 10, -1), routing.expert_ids.reshape(3, 10, -1)
    bias = weights["mlp.gate.e_score_correction_bias"]
    produced = adapter().moe_balance(config.to_dict(), scores, ids, bias)
    load = expert_load(config, routing.expert_ids)
    np.testing.assert_array_equal(produced["load"], load)
    assert_close(produced["new_bias"], bias_update(config, bias, load), "new_bias")
    assert_close(produced["sequence_loss"], sequence_balance_loss(config, scores).loss, "sequence_loss")
    v2 = v2_balance_losses(config, scores, ids)
    for loss in ("expert_loss", "device_loss", "comm_loss"):
        assert_close(produced[loss], getattr(v2, loss), loss)
    plan = dispatch_plan(config, routing.expert_ids, 4)
    produced = adapter().dispatch_plan(config.to_dict(), routing.expert_ids, 4)
    for name_ in ("entries", "counts", "groups_per_token"):
        np.testing.assert_array_equal(produced[name_], getattr(plan, name_))


# ------------------------------------------------------------------------------ lower precisions


@pytest.mark.parametrize("dtype, bound", [("float32", 1e-5), ("bfloat16", 5e-2), ("float16", 5e-3)])
def test_lower_precisions_stay_near_the_truth(dtype, bound):
    config = load_preset("tiny")
    weights = mla_weights("tiny")
    hidden = np.random.default_rng(8).standard_normal((2, 9, config.hidden_size))
    truth = mla_forward(config, weights, hidden, np.array([0, 100])).output
    output = adapter(dtype).mla_prefill(config.to_dict(), weights, hidden, np.array([0, 100]))["output"]
    error = np.linalg.norm(output - truth) / np.linalg.norm(truth)
    assert 0 < error < bound
    assert adapter(dtype).PROFILE == {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


# ------------------------------------------------------------------------------ the mutant zoo


def test_catalogue_has_at_least_25_named_mutants():
    names = [entry["name"] for entry in mutate.catalogue()]
    assert len(names) >= 25 and len(set(names)) == len(names)
    for entry in mutate.catalogue():
        assert {"name", "bug", "steps", "find", "replace"} <= set(entry), entry["name"]
        assert entry["find"].strip() != entry["replace"].strip(), entry["name"]


@pytest.mark.parametrize("entry", mutate.catalogue() + mutate.correct_variants(), ids=lambda entry: entry["name"])
def test_mutant_applies_cleanly(entry):
    source = mutate.ADAPTER.read_text()
    assert len(mutate.matching_lines(source, entry["find"])) == 1
    patched = mutate.patched_source(entry, source)
    assert len(patched.splitlines()) == len(source.splitlines())
    assert sum(a != b for a, b in zip(patched.splitlines(), source.splitlines())) == 1
    mutate.load(entry)  # compiles and configures


@functools.lru_cache(maxsize=None)
def behaviour_inputs() -> tuple[tuple[str, dict], ...]:
    """(entry point, arguments): the golden cases' inputs, plus a chunk whose right padding holds random hidden states."""
    directory = Path(default_golden_dir())
    inputs = []
    for entry in read_manifest(directory / "manifest.yaml")["cases"].values():
        if not hasattr(adapter(), entry["entry_point"]):
            continue
        case = load_case(directory, entry)
        available = {**case["input"], **entry["args"], "config": dict(entry["config"]), "weights": case["weight"]}
        inputs.append((entry["entry_point"], available))
    config = load_preset("tiny-yarn")
    rows, cached, new, hidden = cache_and_chunk(config, [0, 7, 23], [9, 4, 6], 9)
    inputs.append(("mla_extend", {"config": config.to_dict(), "weights": mla_weights("tiny-yarn"), "hidden": hidden,
                                  "cache_rows": rows, "cache_lengths": cached, "query_lengths": new}))
    return tuple(inputs)


def _run(module, entry_point: str, available: dict):
    try:
        return call(getattr(module, entry_point), entry_point, {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in available.items()})
    except Exception as error:  # noqa: BLE001 - a mutant may crash: that is a change of behaviour too
        return error


def difference(original: dict, mutated) -> float:
    """Largest relative difference over the arrays both return (inf for a crash, a shape or an inf/NaN pattern change)."""
    if isinstance(mutated, (NameError, SyntaxError, TypeError)):
        raise AssertionError(f"the mutant's own text is broken: {mutated!r}")
    if isinstance(mutated, Exception):
        return np.inf
    worst = 0.0
    for key in original.keys() & mutated.keys():
        a, b = np.asarray(original[key], np.float64), np.asarray(mutated[key], np.float64)
        if a.shape != b.shape or not np.array_equal(np.isfinite(a), np.isfinite(b)):
            return np.inf
        finite = np.isfinite(a)
        scale = max(float(np.abs(a[finite]).max(initial=0.0)), 1e-300)
        worst = max(worst, float(np.abs(a[finite] - b[finite]).max(initial=0.0)) / scale)
    return worst


def test_behaviour_inputs_cover_every_entry_point_of_the_adapter():
    implemented = {name for name in entry_points() if callable(getattr(adapter(), name, None))}
    assert implemented >= {"latent_attention_core", "mla_prefill", "mla_extend", "moe_route", "moe_layer", "moe_balance", "dispatch_plan"}
    assert {entry_point for entry_point, _ in behaviour_inputs()} == implemented


@pytest.mark.parametrize("entry", [entry for entry in mutate.catalogue() if entry.get("profile") != "fp8"],  # FP8 code runs in fp8 mode only
                         ids=lambda entry: entry["name"])
def test_mutant_changes_behaviour_in_float64(entry):
    original, mutant = adapter(), mutate.load(entry, "float64")
    for entry_point, available in behaviour_inputs():
        expected = _run(original, entry_point, available)
        assert not isinstance(expected, Exception), f"the unpatched adapter raised {expected!r} on {entry_point}"
        if difference(expected, _run(mutant, entry_point, available)) > 1e-6:
            return
    pytest.fail(f"mutant {entry['name']} changes nothing by more than 1e-6 relative on any input")
