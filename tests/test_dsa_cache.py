"""The indexer's FP8 key cache (spec/dsa.yaml DSA.15-DSA.18): pages built and read byte by byte with struct and the
e4m3fn table of tests/independent_dsa.py (independent of the encoder), the scale rules from their published formulas, the
logits against a per-key loop over the block table and against DSA.8, and the fp8 emulation's cached indexer keys."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from independent_dsa import slow_e4m3fn
from mla_ref import SparseCache, generate_attention_weights, load_preset, mla_forward
from mla_ref.dsa import index_scores, stored_index_keys
from mla_ref.dsa_cache import decode_index_key_pages, encode_index_keys, index_key_scale, paged_index_logits, write_index_key_pages
from mla_ref.errors import InputError, ShapeError
from mla_ref.fp8 import act_quant
from mla_ref.precision import round_bf16
from mla_ref.trace import Trace

DIM, BLOCK = 128, 4


def empty_pages(num_blocks: int = 3, fill: int = 0xFF) -> np.ndarray:
    return np.full((num_blocks, BLOCK, 1, DIM + 4), fill, dtype=np.uint8)


def slow_slot(pages: np.ndarray, page: int, offset: int) -> tuple[list[int], float]:
    """Slot ``offset`` of ``page`` read from the page's raw bytes: D codes at offset * D, the float32 at BLOCK * D + 4 * offset."""
    raw = pages[page].tobytes()
    codes = list(raw[offset * DIM: (offset + 1) * DIM])
    (scale,) = struct.unpack("<f", raw[BLOCK * DIM + 4 * offset: BLOCK * DIM + 4 * offset + 4])
    return codes, scale


@pytest.mark.parametrize("amax, plain, ue8m0", [
    (448.0, 1.0, 1.0),  # exactly 448 x 2^0
    (1000.0, np.float32(1000.0) / np.float32(448.0), 4.0),  # past 448: a scale above 1
    (0.0, np.float32(1e-4) / np.float32(448.0), 2.0 ** -22),  # the floor (facts A1.6: amax 1e-4 -> 2^-22)
    (5e-5, np.float32(1e-4) / np.float32(448.0), 2.0 ** -22),
    (56.0, 0.125, 0.125),
])
def test_scale_rules_follow_the_published_formulas(amax, plain, ue8m0):
    assert index_key_scale(amax, "plain") == np.float32(plain) and index_key_scale(amax, "ue8m0") == ue8m0


def test_the_page_holds_every_code_then_every_scale():
    rng = np.random.default_rng(0)
    keys = round_bf16(rng.standard_normal((5, DIM)) * [[1000.0], [1.0], [1e-3], [3.0], [0.0]])
    slots = np.array([5, 0, -1, 11, 3])  # page 1 offset 1, page 0 offset 0, skipped, page 2 offset 3, page 0 offset 3
    pages = write_index_key_pages(empty_pages(), keys, slots, "plain")
    touched = np.zeros(pages.shape[0] * BLOCK * (DIM + 4), bool).reshape(pages.shape[0], -1)
    for token, slot in enumerate(slots):
        if slot < 0:
            continue
        page, offset = divmod(int(slot), BLOCK)
        codes, scale = slow_slot(pages, page, offset)
        assert scale == np.float32(max(np.abs(keys[token]).max(), 1e-4)) / np.float32(448)
        decoded = np.array([slow_e4m3fn(code) for code in codes]) * scale
        assert np.all(np.abs(decoded - keys[token]) <= np.abs(keys[token]) * 2.0 ** -4 + scale * 2.0 ** -10)
        touched[page, offset * DIM:(offset + 1) * DIM] = True
        touched[page, BLOCK * DIM + 4 * offset: BLOCK * DIM + 4 * offset + 4] = True
    assert np.all(pages.reshape(touched.shape)[~touched] == 0xFF)  # every other byte kept, the skipped token nowhere


def test_decoding_is_exact_and_reads_what_was_written():
    rng = np.random.default_rng(1)
    keys = round_bf16(rng.standard_normal((12, DIM)) * 2.0 ** rng.uniform(-8, 8, size=(12, 1)))
    pages = write_index_key_pages(empty_pages(), keys, np.arange(12), "ue8m0")
    decoded = decode_index_key_pages(pages)  # [3, BLOCK, DIM]
    codes, scales = encode_index_keys(keys, "ue8m0")
    for token in range(12):
        slot_codes, scale = slow_slot(pages, token // BLOCK, token % BLOCK)
        assert slot_codes == codes[token].tolist() and scale == scales[token]
        exact = [slow_e4m3fn(code) * scale for code in slot_codes]  # a power-of-two scale: exact in float64 either way
        assert decoded[token // BLOCK, token % BLOCK].tolist() == exact


def test_subnormal_and_negative_zero_codes_of_a_floored_key():
    keys = np.zeros((2, DIM))
    keys[0, :3] = [1.0, -1e-7, 2.0 ** -9 / 448]  # scale 1 / 448: -1e-7 rounds to -0, the third is the smallest subnormal
    codes, scales = encode_index_keys(keys, "plain")
    assert codes[0, :3].tolist() == [0x7E, 0x80, 0x01] and codes[1].max() == 0 and scales[1] == np.float32(1e-4) / np.float32(448)


def _logits_case(seed: int = 2):
    """Two sequences on shuffled pages, the block table padded with -1, 0xFF in every slot past a context."""
    rng = np.random.default_rng(seed)
    lengths, next_n, heads = np.array([10, 3]), 2, 3
    table = np.array([[2, 0, 3], [1, -1, -1]])
    pages = empty_pages(4)
    for b, length in enumerate(lengths):
        positions = np.arange(length)
        keys = round_bf16(rng.standard_normal((length, DIM)) * 2.0 ** rng.uniform(-3, 3, size=(length, 1)))
        pages = write_index_key_pages(pages, keys, table[b, positions // BLOCK] * BLOCK + positions % BLOCK, "plain")
    q_codes, q_scale = act_quant(rng.standard_normal((2, next_n, heads, DIM)), "ue8m0")
    head_weights = rng.standard_normal((2, next_n, heads))
    logit_weights = (head_weights * q_scale[..., 0] * DIM ** -0.5).astype(np.float32).astype(np.float64)
    return q_codes, q_scale, pages, logit_weights, lengths, table


def test_logits_follow_the_block_table_and_the_mtp_offset():
    q_codes, _, pages, logit_weights, lengths, table = _logits_case()
    logits = paged_index_logits(q_codes, pages, logit_weights, lengths, table)
    assert logits.shape == (2, 2, 3 * BLOCK)
    q_values = np.vectorize(slow_e4m3fn)(q_codes)
    for b in range(2):
        for i in range(2):
            last = lengths[b] - 2 + i  # the query's own position
            for t in range(3 * BLOCK):
                if t > last:
                    assert logits[b, i, t] == -np.inf
                    continue
                codes, scale = slow_slot(pages, int(table[b, t // BLOCK]), t % BLOCK)
                key = np.array([slow_e4m3fn(code) for code in codes]) * scale
                expected = sum(max(float(q_values[b, i, h] @ key), 0.0) * logit_weights[b, i, h] for h in range(3))
                assert logits[b, i, t] == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_logits_are_dsa8_scores_of_the_dequantised_query_and_keys():
    q_codes, q_scale, pages, logit_weights, lengths, table = _logits_case(3)
    logits = paged_index_logits(q_codes, pages, logit_weights, lengths, table)
    keys = decode_index_key_pages(pages)[table[0]].reshape(1, -1, DIM)[:, : lengths[0]]  # sequence 0's keys in order
    q_hat = np.vectorize(slow_e4m3fn)(q_codes[:1]) * q_scale[:1]
    head_weights = logit_weights[:1] / q_scale[:1, ..., 0] * DIM ** 0.5  # unfolded: DSA.8 applies DIM^-0.5 itself
    scores = index_scores(q_hat, keys, head_weights)
    assert np.allclose(logits[0, :, : lengths[0] - 1], scores[0, :, : lengths[0] - 1], rtol=1e-12, atol=1e-12)


def test_an_emulation_computes_in_its_arithmetic_and_records_dsa18():
    q_codes, _, pages, logit_weights, lengths, table = _logits_case()
    trace = Trace("fp32")
    emulated = paged_index_logits(q_codes, pages, logit_weights, lengths, table, dtype=np.float32, trace=trace)
    truth = paged_index_logits(q_codes, pages, logit_weights, lengths, table)
    finite = np.isfinite(truth)
    assert np.array_equal(np.isfinite(emulated), finite) and "DSA.18" in trace
    assert 0 < np.abs(emulated[finite] - truth[finite]).max() < 1e-5 * np.abs(truth[finite]).max()


@pytest.mark.parametrize("change, error, words", [
    (lambda a: {**a, "k_cache": a["k_cache"].astype(np.float32)}, ShapeError, ("k_cache", "uint8", "DSA.18")),
    (lambda a: {**a, "k_cache": a["k_cache"][..., :-1]}, None, ("DSA.18",)),
    (lambda a: {**a, "q": a["q"].astype(np.float64)}, ShapeError, ("q", "DSA.18")),
    (lambda a: {**a, "context_lens": np.array([1, 3])}, InputError, ("context_lens", "next_n", "DSA.18")),
    (lambda a: {**a, "block_table": np.array([[2, 0, -1], [1, -1, -1]])}, InputError, ("block_table", "DSA.18")),
    (lambda a: {**a, "logit_weights": a["logit_weights"][..., :2]}, ShapeError, ("logit_weights", "DSA.18")),
    (lambda a: {**a, "context_lens": np.array([11, 3])}, InputError, ("k_cache", "NaN", "DSA.18")),  # a poisoned slot read
])
def test_bad_logits_inputs_are_named(change, error, words):
    q_codes, _, pages, logit_weights, lengths, table = _logits_case()
    args = change({"q": q_codes, "k_cache": pages, "logit_weights": logit_weights, "context_lens": lengths, "block_table": table})
    with pytest.raises(error or (ShapeError, InputError)) as raised:
        paged_index_logits(**args)
    assert all(word in str(raised.value) for word in words), str(raised.value)


@pytest.mark.parametrize("call, error, words", [
    (lambda: write_index_key_pages(empty_pages().astype(np.float64), np.zeros((1, DIM)), [0]), ShapeError, ("k_cache", "uint8", "DSA.16")),
    (lambda: write_index_key_pages(empty_pages(), np.zeros((1, 64)), [0]), ShapeError, ("keys", "index_head_dim = 128", "DSA.16")),
    (lambda: write_index_key_pages(empty_pages(), np.zeros((2, DIM)), [0, 0]), InputError, ("slot_mapping", "distinct", "DSA.16")),
    (lambda: write_index_key_pages(empty_pages(), np.zeros((1, DIM)), [12]), InputError, ("slot_mapping", "DSA.16")),
    (lambda: write_index_key_pages(empty_pages(), np.zeros((1, DIM)), [0.0]), ShapeError, ("slot_mapping", "integers", "DSA.16")),
    (lambda: write_index_key_pages(empty_pages(), np.full((1, DIM), np.nan), [0]), InputError, ("keys", "finite", "DSA.16")),
    (lambda: write_index_key_pages(empty_pages(), np.zeros((1, DIM)), [0], "e4m3"), InputError, ("scale_rule", "ue8m0", "DSA.15")),
    (lambda: decode_index_key_pages(np.zeros((2, BLOCK, DIM + 4), np.uint8)), ShapeError, ("k_cache", "DSA.17")),
])
def test_bad_cache_inputs_are_named(call, error, words):
    with pytest.raises(error) as raised:
        call()
    assert all(word in str(raised.value) for word in words), str(raised.value)


def test_the_fp8_emulation_reads_a_float_prefix_as_the_fp8_cache_holds_it():
    """DSA.7 with DSA.6's FP8: indexer keys cached as floats and keys cached already quantised give the same scores."""
    config = load_preset("tiny-dsa")
    weights = generate_attention_weights(config, seed=0)
    hidden = np.random.default_rng(4).standard_normal((1, 14, config.hidden_size))
    scores = []
    for prefix_fp8 in (False, True):
        cache = mla_forward(config, weights, hidden[:, :11], cache=SparseCache.empty(config, 1), indexer_fp8=prefix_fp8).cache
        trace = Trace()
        mla_forward(config, weights, hidden[:, 11:], cache=cache, indexer_fp8=True, trace=trace)
        scores.append(trace["DSA.8"]["scores"])
    assert np.array_equal(scores[0], scores[1])
    keys = cache.index_key_rows()  # quantised when they were written: the round trip leaves them as they are
    assert np.array_equal(stored_index_keys(keys, True), keys)
