"""Greedy speculative decoding with any drafter, MTP drafts by default (spec/mtp.yaml MTP.7-MTP.11).

Each step a drafter proposes D tokens per sequence (:class:`MTPDrafter`, MTP.7, or any callable
of the :class:`Drafter` shape); the main model verifies them in one cached forward of D + 1
tokens (MTP.8), keeps the longest agreeing prefix plus its own next token (MTP.9) and rolls its
caches back past the rejected ones (MTP.10). The emitted tokens equal plain greedy decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

import numpy as np

from .config import ModelConfig
from .errors import CacheError, ConfigError, InputError, ShapeError
from .model import ModelCache, ModelResult, check_model_weights, greedy_token, model_forward, pad_prompts
from .mtp import check_depths, main_hidden_for_mtp, mtp_module, mtp_module_layers
from .trace import Trace, emit


@dataclasses.dataclass(frozen=True)
class DraftContext:
    """What a drafter sees; arrays are right-padded past each sequence's length."""

    tokens: np.ndarray  # [batch, context]: the known tokens t_0 .. t_n of each sequence
    lengths: np.ndarray  # [batch]: n + 1, the known tokens per sequence
    main_hidden: np.ndarray  # [batch, context - 1, hidden_size]: h^0 (MTP.1) of positions 0 .. n - 1
    num_draft_tokens: int  # D


class Drafter(Protocol):
    """Any callable that proposes ``[batch, num_draft_tokens]`` integer tokens to follow each sequence."""

    def __call__(self, context: DraftContext) -> np.ndarray: ...


def take_rows(array: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """``[batch, width, ...]``: row j of sequence b is ``array[b, starts[b] + j]``; rows past the end read as 0."""
    index = starts[:, None] + np.arange(width)[None, :]  # [batch, width]
    padded = np.concatenate([array, np.zeros((array.shape[0], 1) + array.shape[2:], array.dtype)], axis=1)
    return padded[np.arange(array.shape[0])[:, None], np.minimum(index, array.shape[1])]


def put_rows(array: np.ndarray, starts: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A copy of ``array [batch, length, ...]``, grown as needed, with ``rows[b, j]`` at ``starts[b] + j`` for ``j < counts[b]``."""
    needed = max(array.shape[1], int((starts + counts).max(initial=0)))
    grown = np.zeros((array.shape[0], needed) + array.shape[2:], array.dtype)
    grown[:, : array.shape[1]] = array
    batch_index, offset = np.nonzero(np.arange(rows.shape[1])[None, :] < counts[:, None])
    grown[batch_index, starts[batch_index] + offset] = rows[batch_index, offset]
    return grown


class MTPDrafter:
    """The MTP modules as a drafter of D tokens; each depth caches the rows whose embedded token is known.

    Depth k runs module m(k) (config mtp_module_reuse, MTP.3) with its own rows and cache; with
    recurrent reuse only depth 1 has rows of its own, and draft steps 2 .. D each add one
    temporary row to that cache (MTP.7).

    It keeps state across calls (the module caches and the outputs h^k the next depth reads):
    use a fresh drafter for each generation. ``cache_kind``: ``latent`` or ``naive``; ``trace``
    records (and with a precision, emulates) the modules' MTP.2-MTP.4.
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], num_draft_tokens: int | None = None, cache_kind: str = "latent",
                 trace: Trace | None = None) -> None:
        self.num_draft_tokens = check_depths(config, num_draft_tokens, drafting=True)
        if config.mtp_rope_position != "hidden":
            raise ConfigError("mtp_rope_position", f"cached MTP drafting supports 'hidden' only (mla_forward places new rows at the "
                              f"cache length), got {config.mtp_rope_position!r}; both agree in exact arithmetic (spec/mtp.yaml)", "MTP.7")
        if cache_kind not in ("latent", "naive"):
            raise CacheError("cache_kind", f"expected 'latent' or 'naive', got {cache_kind!r}", "MTP.7")
        check_model_weights(config, weights, mtp_module_layers(config, self.num_draft_tokens), mtp=True)
        self.config, self.weights, self.cache_kind, self.trace = config, weights, cache_kind, trace
        self.caches: ModelCache | None = None  # one cache per module, created at the first call
        self.outputs: list[np.ndarray] = []  # h^k [batch, rows, hidden_size], valid up to module k's cache length
        self.draft_logits: np.ndarray | None = None  # [batch, D, vocab_size]: what the last call's drafts were chosen from

    def __call__(self, context: DraftContext) -> np.ndarray:
        """MTP.7 — chain depths 1 .. D at the last known position n - 1; ``d_k`` = greedy token of depth k (V3R section 5.4.3).

        Depth k runs module m(k); with recurrent reuse, depths 2 .. D are single rows of module 1 after depth 1's rows.
        """
        config, depths = self.config, self.num_draft_tokens
        if context.num_draft_tokens != depths:
            raise InputError("num_draft_tokens", f"this MTP drafter drafts {depths} tokens, asked {context.num_draft_tokens}", "MTP.7")
        batch = context.tokens.shape[0]
        known = context.lengths - 1  # n: rows 0 .. n - 1 have h^0; t_0 .. t_n are known
        chained = 1 if config.mtp_module_reuse == "recurrent" else depths  # depths with rows and a cache of their own
        if self.caches is None:
            self.caches = ModelCache.empty(config, batch, num_layers=chained, kind=self.cache_kind)
            self.outputs = [np.zeros((batch, 0, config.hidden_size)) for _ in range(chained)]
        elif len(self.caches.lengths) != batch or (self.caches.lengths > known).any():
            raise InputError("context", f"{batch} sequences of {known.tolist()} positions do not continue the {len(self.caches.lengths)} "
                             f"this drafter has cached ({self.caches.lengths.tolist()} rows): use a fresh MTPDrafter", "MTP.7")
        tokens = context.tokens  # t_{n+j} = d_j is appended as each depth drafts
        previous = context.main_hidden  # h^{k-1} of rows 0 .. n - 1
        module_caches, draft_logits = [], []
        for depth in range(1, chained + 1):
            cache = self.caches.layers[depth - 1]
            cached = cache.lengths  # [batch]: rows 0 .. cached - 1 are in the module's cache
            new_rows = known - cached  # [batch]: rows cached .. n - 1 run now
            width = int(new_rows.max(initial=0))
            hidden, logits, cache = mtp_module(config, self.weights, depth, take_rows(previous, cached, width),
                                               take_rows(tokens, cached + depth, width), cache=cache,
                                               query_lengths=new_rows, trace=self.trace)  # MTP.2-MTP.4: [batch, width, ..]
            last_row = np.maximum(new_rows - 1, 0)  # row n - 1 in this call's rows
            draft_logits.append(logits[np.arange(batch), last_row])  # [batch, vocab_size]: d_k = MODEL.6 of row n - 1
            module_caches.append(cache.truncate(np.clip(known - depth + 1, cached, known)))  # keep rows i <= n - k
            previous = self.outputs[depth - 1] = put_rows(self.outputs[depth - 1], cached, hidden, new_rows)  # h^k, rows 0 .. n - 1
            tokens = put_rows(tokens, known + depth, greedy_token(draft_logits[-1])[:, None], np.ones(batch, np.int64))  # t_{n+k} = d_k
        if chained < depths:
            draft_logits += self._recurrent_logits(hidden[np.arange(batch), last_row][:, None], greedy_token(draft_logits[-1]),
                                                   module_caches[0], depths - 1)
        self.caches = ModelCache(tuple(module_caches))
        self.draft_logits = np.stack(draft_logits, axis=1)  # [batch, depths, vocab_size]
        return greedy_token(self.draft_logits)  # MODEL.6: [batch, depths]

    def _recurrent_logits(self, hidden: np.ndarray, draft: np.ndarray, cache, steps: int) -> list[np.ndarray]:
        """MTP.7, recurrent reuse — the logits of d_2 .. d_D, one row of module 1 each.

        Each row follows module 1's cache (rows 0 .. n - 1, then the earlier steps' rows) and
        combines the previous row's h (after shared_head.norm) with Emb(d_{k-1}); the drafter
        keeps none of these rows.
        """
        batch, draft_logits = len(draft), []
        for _ in range(steps):
            hidden, logits, cache = mtp_module(self.config, self.weights, 1, hidden, draft[:, None], cache=cache,
                                               query_lengths=np.ones(batch, np.int64), trace=self.trace)  # MTP.2-MTP.4
            draft_logits.append(logits[:, 0])  # [batch, vocab_size]
            draft = greedy_token(logits[:, 0])  # MODEL.6: d_k
        return draft_logits


def verify_drafts(config: ModelConfig, weights: Mapping, last_tokens: np.ndarray, drafts: np.ndarray, cache: ModelCache,
                  active: np.ndarray, trace: Trace | None = None) -> tuple[ModelResult, np.ndarray]:
    """MTP.8 — one cached main forward of ``[t_n, d_1 .. d_D]`` (s_q = D + 1, bottom-right causal) and its greedy tokens (V3R section 5.4.3)."""
    candidates = np.concatenate([last_tokens[:, None], drafts], axis=1)  # [batch, D + 1]
    result = model_forward(config, weights, candidates, cache, query_lengths=np.where(active, candidates.shape[1], 0), trace=trace)
    return result, greedy_token(result.logits)  # MODEL.6: [batch, D + 1]


def accept_drafts(drafts: np.ndarray, greedy: np.ndarray) -> np.ndarray:
    """MTP.9 — ``a`` = the longest prefix with ``d_{j+1} == g_j``; the step emits ``g_0 .. g_a`` (V3R section 5.4.3)."""
    agree = drafts == greedy[:, :-1]  # [batch, D]
    return np.cumprod(agree, axis=1).sum(axis=1)  # [batch]


def rollback_rejected(cache: ModelCache, rejected) -> ModelCache:
    """MTP.10 — every layer forgets the last ``rejected[b]`` positions of sequence b (V3R section 5.4.3)."""
    rejected = np.asarray(rejected)
    lengths = cache.lengths
    if rejected.shape != lengths.shape or rejected.dtype.kind not in "iu" or (rejected < 0).any() or (rejected > lengths).any():
        raise CacheError("rejected", f"expected integers in 0 .. the cache lengths {lengths.tolist()} (a rollback cannot pass "
                         f"the start of the cache), got {rejected.tolist()}", "MTP.10")
    return cache.truncate(lengths - rejected)


def acceptance_counts(accepted: np.ndarray, active: np.ndarray, depths: int) -> tuple[np.ndarray, np.ndarray]:
    """MTP.11 — per depth j: active sequences with ``a >= j`` (accepted) and all active ones (proposed) (V3R section 5.4.3)."""
    reached = active[:, None] & (accepted[:, None] >= np.arange(1, depths + 1)[None, :])  # [batch, depths]
    return reached.sum(axis=0), np.full(depths, int(active.sum()))


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """``tokens [batch, max_new_tokens]``, acceptance counts per depth ``[depths]``, verify steps, the main cache."""

    tokens: np.ndarray
    accepted_per_depth: np.ndarray
    proposed_per_depth: np.ndarray
    verify_steps: int
    cache: ModelCache  # the prompts and every emitted token but the last (also those past max_new_tokens)

    @property
    def acceptance_rate(self) -> np.ndarray:
        """``accepted / proposed`` per depth ``[depths]``; NaN where nothing was proposed."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.accepted_per_depth / self.proposed_per_depth


def speculative_generate(config: ModelConfig, weights: Mapping[str, np.ndarray], prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         drafter: Drafter | None = None, num_draft_tokens: int | None = None, cache: ModelCache | None = None,
                         trace: Trace | None = None) -> SpeculativeResult:
    """Greedy speculative decoding of ragged ``prompts``: exactly the tokens of greedy decoding (spec/mtp.yaml conventions.speculative).

    ``drafter`` defaults to a fresh :class:`MTPDrafter` of ``num_draft_tokens`` (default
    config.mtp_num_depths) depths; another drafter needs ``num_draft_tokens``. ``cache``: the
    main model's, empty (default LatentCache per layer). A trace records the last step's MTP.7-MTP.10
    (and the main model's steps, see model_forward) and the totals of MTP.11.
    """
    if drafter is None:
        drafter = MTPDrafter(config, weights, num_draft_tokens)
        num_draft_tokens = drafter.num_draft_tokens
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, (int, np.integer)) or num_draft_tokens < 1:
        raise InputError("num_draft_tokens", f"expected an int >= 1 (tokens per draft), got {num_draft_tokens!r}", "MTP.7")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError("max_new_tokens", f"expected an int >= 1, got {max_new_tokens!r}", "MTP.9")
    depths = int(num_draft_tokens)
    tokens, lengths = pad_prompts(prompts)
    batch = tokens.shape[0]
    prefill = model_forward(config, weights, tokens, ModelCache.empty(config, batch) if cache is None else cache,
                            query_lengths=lengths, trace=trace)
    cache = prefill.cache
    first = greedy_token(prefill.logits[np.arange(batch), lengths - 1])  # MODEL.6: t_n, [batch]
    history = put_rows(tokens, lengths, first[:, None], np.ones(batch, np.int64))  # [batch, context]
    known = lengths + 1
    main_hidden = main_hidden_for_mtp(config, prefill)  # MTP.1: [batch, context - 1, hidden_size]
    emitted = np.ones(batch, np.int64)
    accepted_per_depth, proposed_per_depth, steps = np.zeros(depths, np.int64), np.zeros(depths, np.int64), 0
    while (active := emitted < max_new_tokens).any():
        drafts = emit(trace, "MTP.7", check_drafts(config, drafter(DraftContext(history, known, main_hidden, depths)), batch, depths))
        verified, greedy = verify_drafts(config, weights, history[np.arange(batch), known - 1], drafts, cache, active, trace)
        emit(trace, "MTP.8", verified.logits, greedy)
        accepted = emit(trace, "MTP.9", np.where(active, accept_drafts(drafts, greedy), 0))  # [batch]
        new_counts = np.where(active, accepted + 1, 0)  # g_0 .. g_a
        cache = rollback_rejected(verified.cache, np.where(active, depths - accepted, 0))  # MTP.10
        emit(trace, "MTP.10", cache.lengths)
        main_hidden = put_rows(main_hidden, known - 1, main_hidden_for_mtp(config, verified), new_counts)
        history = put_rows(history, known, greedy, new_counts)
        known, emitted = known + new_counts, emitted + new_counts
        step_accepted, step_proposed = acceptance_counts(accepted, active, depths)  # MTP.11
        accepted_per_depth, proposed_per_depth, steps = accepted_per_depth + step_accepted, proposed_per_depth + step_proposed, steps + 1
    emit(trace, "MTP.11", accepted_per_depth, proposed_per_depth)
    return SpeculativeResult(take_rows(history, lengths, max_new_tokens), accepted_per_depth, proposed_per_depth, steps, cache)


def check_drafts(config: ModelConfig, drafts, batch: int, depths: int) -> np.ndarray:
    """A drafter's output: integer ids ``[batch, depths]`` within the vocabulary."""
    drafts = np.asarray(drafts)
    if drafts.shape != (batch, depths) or drafts.dtype.kind not in "iu":
        raise ShapeError("drafts", f"expected integer ids of shape [{batch}, {depths}], got {drafts.dtype} {list(drafts.shape)}", "MTP.7")
    if ((drafts < 0) | (drafts >= config.vocab_size)).any():
        b, j = (int(x) for x in np.argwhere((drafts < 0) | (drafts >= config.vocab_size))[0])
        raise InputError("drafts", f"expected ids in 0 .. {config.vocab_size - 1} (vocab_size), got {int(drafts[b, j])} "
                         f"at sequence {b}, draft {j + 1}", "MTP.7")
    return drafts.astype(np.int64)
