"""Speculative decoding: exactly greedy's tokens for D = 1, 2, 3 and any drafter; acceptance 100% / 0% for drafters
that are always right / always wrong; caches after a rollback equal caches that never saw the rejected tokens;
the cached MTP drafter equals an uncached independent chain; bad input."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from conftest import preset, relative_error
from independent_model import slow_drafts
from mla_ref import CacheError, ConfigError, InputError, NaiveCache, ShapeError, WeightError
from mla_ref.model import ModelCache, greedy_generate, model_forward, pad_prompts
from mla_ref.speculative import DraftContext, MTPDrafter, rollback_rejected, speculative_generate, verify_drafts
from mla_ref.weights import generate_weights

TOL = 1e-12
PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38]]


@functools.lru_cache(maxsize=None)
def model(depths: int, name: str = "tiny"):
    config = preset(name).replace(num_nextn_predict_layers=depths)
    return config, generate_weights(config, 0)


class GreedyDrafter:
    """Drafts the main model's own greedy continuation (recomputed without a cache), then spoils it from ``spoil_at``.

    ``spoil_at(call)`` -> per sequence, the first draft index that is made wrong (D = never); every call is logged.
    """

    def __init__(self, config, weights, spoil_at):
        self.config, self.weights, self.spoil_at, self.calls = config, weights, spoil_at, []

    def __call__(self, context):
        known = [context.tokens[b, : context.lengths[b]].tolist() for b in range(len(context.lengths))]
        drafts = greedy_generate(self.config, self.weights, known, context.num_draft_tokens).tokens
        first_wrong = np.asarray(self.spoil_at(len(self.calls), len(known), context.num_draft_tokens))
        wrong = np.arange(context.num_draft_tokens)[None, :] >= first_wrong[:, None]
        self.calls.append(first_wrong)
        return np.where(wrong, (drafts + 1) % self.config.vocab_size, drafts)


def always_right(call, batch, depths):
    return np.full(batch, depths)


def always_wrong(call, batch, depths):
    return np.zeros(batch, np.int64)


def sometimes_right(call, batch, depths):
    return np.random.default_rng(call).integers(0, depths + 1, size=batch)


@pytest.mark.parametrize("depths", [1, 2, 3])
def test_mtp_speculative_decoding_emits_exactly_greedys_tokens(depths):
    config, weights = model(depths)
    greedy = greedy_generate(config, weights, PROMPTS, 9)
    speculative = speculative_generate(config, weights, PROMPTS, 9)
    assert speculative.tokens.tolist() == greedy.tokens.tolist()
    assert speculative.proposed_per_depth.shape == (depths,) and (speculative.proposed_per_depth > 0).all()


@pytest.mark.parametrize("depths", [1, 2, 3])
@pytest.mark.parametrize("spoil_at, rate", [(always_right, 1.0), (always_wrong, 0.0), (sometimes_right, None)])
def test_any_drafter_gives_greedys_tokens_and_its_acceptance(depths, spoil_at, rate):
    config, weights = model(depths)
    drafter = GreedyDrafter(config, weights, spoil_at)
    result = speculative_generate(config, weights, PROMPTS, 8, drafter=drafter, num_draft_tokens=depths)
    assert result.tokens.tolist() == greedy_generate(config, weights, PROMPTS, 8).tokens.tolist()
    if rate is not None:
        assert result.acceptance_rate.tolist() == [rate] * depths
    emitted = np.ones(len(PROMPTS), np.int64)  # replay: a sequence is active while it has fewer than 8 tokens
    accepted, proposed = np.zeros(depths, np.int64), np.zeros(depths, np.int64)
    for first_wrong in drafter.calls:
        active = emitted < 8
        accepted += (active[:, None] & (first_wrong[:, None] >= np.arange(1, depths + 1))).sum(axis=0)
        proposed += active.sum()
        emitted += np.where(active, first_wrong + 1, 0)
    assert result.accepted_per_depth.tolist() == accepted.tolist()
    assert result.proposed_per_depth.tolist() == proposed.tolist()
    assert result.verify_steps == len(drafter.calls)


def test_always_right_needs_one_verification_per_d_plus_one_tokens():
    config, weights = model(3)
    drafter = GreedyDrafter(config, weights, always_right)
    result = speculative_generate(config, weights, [PROMPTS[0]], 9, drafter=drafter, num_draft_tokens=3)
    assert result.verify_steps == 2  # 1 token from the prefill, then 4 per step
    assert result.cache.lengths.tolist() == [len(PROMPTS[0]) + 8]


@pytest.mark.parametrize("kind", ["latent", "naive", "paged"])
@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_a_rolled_back_cache_equals_one_that_never_saw_the_rejected_tokens(kind, accepted):
    config, weights = model(3)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    empty = ModelCache.empty(config, 2, kind=kind, max_tokens=16, block_size=3, shuffle_seed=1)
    prefill = model_forward(config, weights, prompts, empty)
    last, drafts = np.array([13, 14]), np.array([[20, 21, 22], [30, 31, 32]])
    verified, _ = verify_drafts(config, weights, last, drafts, prefill.cache, np.array([True, True]))
    rolled = rollback_rejected(verified.cache, np.full(2, 3 - accepted))
    never = model_forward(config, weights, np.concatenate([last[:, None], drafts[:, :accepted]], axis=1), prefill.cache).cache
    assert rolled.lengths.tolist() == never.lengths.tolist() == [5 + accepted] * 2
    for layer_rolled, layer_never in zip(rolled.layers, never.layers):
        if isinstance(layer_rolled, NaiveCache):
            pairs = zip(layer_rolled.keys_values(), layer_never.keys_values())
        else:
            pairs = [(layer_rolled.key_rows(), layer_never.key_rows())]
        for rows_rolled, rows_never in pairs:
            assert rows_rolled.shape == rows_never.shape and relative_error(rows_rolled, rows_never) <= TOL
    after_rolled = model_forward(config, weights, np.array([[40], [41]]), rolled)
    after_never = model_forward(config, weights, np.array([[40], [41]]), never)
    assert relative_error(after_rolled.logits, after_never.logits) <= TOL


def test_the_main_cache_after_generation_holds_exactly_the_emitted_tokens():
    config, weights = model(2)
    drafter = GreedyDrafter(config, weights, sometimes_right)
    result = speculative_generate(config, weights, PROMPTS, 7, drafter=drafter, num_draft_tokens=2)
    greedy = greedy_generate(config, weights, PROMPTS, 12)
    for b, prompt in enumerate(PROMPTS):
        held = int(result.cache.lengths[b])
        sequence = (prompt + greedy.tokens[b].tolist())[:held]
        fresh = model_forward(config, weights, np.array([sequence]), ModelCache.empty(config, 1)).cache
        for layer_result, layer_fresh in zip(result.cache.layers, fresh.layers):
            assert relative_error(layer_result.key_rows()[b, :held], layer_fresh.key_rows()[0]) <= TOL


def drafts_seen(config, weights, depths, prompts=PROMPTS[:2], max_new_tokens=6):
    """Speculative decoding with a fresh MTP drafter: (known tokens per sequence, drafts) of every call, and the result."""
    mtp, seen = MTPDrafter(config, weights), []

    def recording(context):
        drafts = mtp(context)
        seen.append(([context.tokens[b, : context.lengths[b]].tolist() for b in range(len(context.lengths))], drafts))
        return drafts

    result = speculative_generate(config, weights, prompts, max_new_tokens, drafter=recording, num_draft_tokens=depths)
    return seen, result


@pytest.mark.parametrize("depths", [2, 3])
def test_the_cached_mtp_drafter_equals_an_uncached_independent_chain(depths):
    config, weights = model(depths, "tiny-v2")
    seen, _ = drafts_seen(config, weights, depths)
    assert len(seen) >= 3
    for known, drafts in seen:
        for b, sequence in enumerate(known):
            assert drafts[b].tolist() == slow_drafts(config, weights, sequence, depths)


@pytest.mark.parametrize("reuse, modules, depths", [("modulo", 2, 3), ("modulo", 1, 3), ("recurrent", 1, 3), ("recurrent", 1, 1)])
def test_reused_modules_draft_as_the_uncached_independent_chain_and_decode_exactly(reuse, modules, depths):
    config, weights = model(modules, "tiny-v2")
    config = config.replace(mtp_module_reuse=reuse, mtp_depths=depths)
    seen, result = drafts_seen(config, weights, depths)
    assert len(seen) >= 2
    for known, drafts in seen:
        for b, sequence in enumerate(known):
            assert drafts[b].tolist() == slow_drafts(config, weights, sequence, depths)
    assert result.tokens.tolist() == greedy_generate(config, weights, PROMPTS[:2], 6).tokens.tolist()


def test_recurrent_and_modulo_reuse_agree_on_the_first_draft_and_differ_after():
    config, weights = model(1, "tiny-v2")
    drafts = {}
    for reuse in ("modulo", "recurrent"):
        reused = config.replace(mtp_module_reuse=reuse, mtp_depths=3)
        drafter = MTPDrafter(reused, weights)
        tokens, lengths = pad_prompts(PROMPTS)
        main = model_forward(reused, weights, tokens[:, :-1], query_lengths=lengths - 1)
        drafts[reuse] = drafter(DraftContext(tokens, lengths, main.post_norm_hidden, 3))
        assert np.array_equal(drafts[reuse], np.argmax(drafter.draft_logits, axis=-1))
    assert np.array_equal(drafts["modulo"][:, 0], drafts["recurrent"][:, 0])
    assert not np.array_equal(drafts["modulo"][:, 1:], drafts["recurrent"][:, 1:])


def test_pre_norm_hidden_source_and_naive_module_caches_also_decode_exactly():
    config, weights = model(2)
    config = config.replace(mtp_hidden_source="pre_norm", mtp_concat_order="hidden_first")
    drafter = MTPDrafter(config, weights, cache_kind="naive")
    result = speculative_generate(config, weights, PROMPTS, 6, drafter=drafter, num_draft_tokens=2)
    assert result.tokens.tolist() == greedy_generate(config, weights, PROMPTS, 6).tokens.tolist()


# ------------------------------------------------------------------ bad input

def test_rollback_past_the_start_of_the_cache_is_rejected():
    config, weights = model(1)
    cache = model_forward(config, weights, np.array([[1, 2, 3], [4, 5, 6]]), ModelCache.empty(config, 2)).cache
    with pytest.raises(CacheError, match=r"rejected: expected integers in 0 \.\. the cache lengths \[3, 3\] .* got \[1, 4\] \(MTP.10\)"):
        rollback_rejected(cache, np.array([1, 4]))
    with pytest.raises(CacheError, match=r"got \[-1, 0\]"):
        rollback_rejected(cache, np.array([-1, 0]))
    with pytest.raises(CacheError, match=r"lengths: expected lengths >= 0"):
        cache.truncate(np.array([-1, 0]))
    assert rollback_rejected(cache, np.array([3, 0])).lengths.tolist() == [0, 3]


def test_more_draft_tokens_than_mtp_modules_are_rejected():
    config, weights = model(2)
    with pytest.raises(ConfigError, match=r"expected a depth in 1 \.\. 2 .* got 3"):
        speculative_generate(config, weights, PROMPTS, 4, num_draft_tokens=3)
    with pytest.raises(WeightError, match=r"model\.layers\.5\.input_layernorm\.weight: missing"):
        MTPDrafter(config.replace(num_nextn_predict_layers=3), weights)


def test_token_rope_positions_cannot_draft_from_a_cache():
    config, weights = model(1)
    with pytest.raises(ConfigError, match=r"mtp_rope_position: cached MTP drafting supports 'hidden' only"):
        MTPDrafter(config.replace(mtp_rope_position="token"), weights)


def test_a_prompt_longer_than_the_cache_is_rejected():
    config, weights = model(1)
    cache = ModelCache.empty(config, 1, kind="paged", max_tokens=4, block_size=2)
    with pytest.raises(CacheError, match=r"block_table: sequence 0 needs position 4, beyond its 2 blocks of 2"):
        speculative_generate(config, weights, [[1, 2, 3, 4, 5]], 3, cache=cache)
    with pytest.raises(CacheError, match=r"beyond its 2 blocks"):  # room for the prompt, not for a verification step
        speculative_generate(config, weights, [[1, 2, 3]], 3, cache=ModelCache.empty(config, 1, kind="paged", max_tokens=4, block_size=2))


def test_prompt_tokens_out_of_vocabulary_are_rejected():
    config, weights = model(1)
    with pytest.raises(InputError, match=r"tokens: expected ids in 0 \.\. 96 \(vocab_size\), got 97 at sequence 1, position 0"):
        speculative_generate(config, weights, [[1, 2], [97]], 3)


def test_bad_drafts_are_rejected():
    config, weights = model(2)
    with pytest.raises(ShapeError, match=r"drafts: expected integer ids of shape \[3, 2\], got int64 \[3, 1\] \(MTP.7\)"):
        speculative_generate(config, weights, PROMPTS, 3, drafter=lambda context: np.zeros((3, 1), np.int64), num_draft_tokens=2)
    with pytest.raises(InputError, match=r"drafts: expected ids in 0 \.\. 96 .* got 97 at sequence 0, draft 1"):
        speculative_generate(config, weights, PROMPTS, 3, drafter=lambda context: np.full((3, 2), 97), num_draft_tokens=2)
    with pytest.raises(InputError, match=r"num_draft_tokens: expected an int >= 1"):
        speculative_generate(config, weights, PROMPTS, 3, drafter=lambda context: np.zeros((3, 2), np.int64))


def test_the_readme_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## The whole model, MTP and speculative decoding", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert "[0. 0.] 7" in capsys.readouterr().out


def test_a_drafter_reused_for_other_sequences_is_rejected():
    config, weights = model(1)
    drafter = MTPDrafter(config, weights)
    speculative_generate(config, weights, [PROMPTS[2]], 4, drafter=drafter, num_draft_tokens=1)
    with pytest.raises(InputError, match=r"context: 1 sequences of \[1\] positions do not continue .* use a fresh MTPDrafter \(MTP.7\)"):
        speculative_generate(config, weights, [[1]], 4, drafter=drafter, num_draft_tokens=1)
    with pytest.raises(InputError, match=r"context: 2 sequences"):
        speculative_generate(config, weights, PROMPTS[:2], 4, drafter=drafter, num_draft_tokens=1)
