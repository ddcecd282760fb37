"""MOE.18 — the expert-parallel dispatch plan: which (token, slot, expert) assignments each rank receives.

Experts are placed contiguously, ``n_routed_experts / ranks`` per rank. An all-to-all
implementation compares the set it delivers to each rank against :attr:`DispatchPlan.entries`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from .config import ModelConfig
from .errors import InputError
from .moe import assignment_order, check_expert_ids
from .trace import Trace, emit


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """``entries [tokens * K, 3]`` rows (token, slot, expert) by expert id, then token, then slot; rank r gets
    ``entries[offsets[r]:offsets[r + 1]]``; ``counts [ranks]``; ``groups_per_token [tokens]``."""

    ranks: int
    experts_per_rank: int
    entries: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    groups_per_token: np.ndarray

    def for_rank(self, rank: int) -> np.ndarray:
        """The ``[counts[rank], 3]`` (token, slot, expert) rows rank ``rank`` receives."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.ranks:
            raise InputError("rank", f"expected an int in 0 .. {self.ranks - 1}, got {rank!r}", "MOE.18")
        return self.entries[self.offsets[rank]: self.offsets[rank + 1]]

    @property
    def per_rank(self) -> list[np.ndarray]:
        """``[for_rank(0), for_rank(1), ...]``."""
        return [self.for_rank(rank) for rank in range(self.ranks)]


def dispatch_plan(config: ModelConfig, expert_ids: npt.ArrayLike, ranks: int, *, enforce_node_limit: bool = True,
                  trace: Trace | None = None) -> DispatchPlan:
    """MOE.18 — per-rank (token, slot, expert) lists, per-rank counts and the node-limit check (V3R section 2.1.2).

    ``ranks`` must divide n_routed_experts. Groups are nodes: a token must reach at most
    topk_group of the n_group contiguous expert groups, else InputError (unless
    ``enforce_node_limit`` is false, e.g. to inspect routing with the 0.0 group fill).
    """
    ids = check_expert_ids(config, expert_ids, ("tokens",), "MOE.18")  # [tokens, num_experts_per_tok]
    experts = config.n_routed_experts
    if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)) or ranks < 1 or experts % ranks:
        raise InputError("ranks", f"expected a divisor of n_routed_experts = {experts} (experts placed contiguously, "
                         f"n_routed_experts / ranks per rank), got {ranks!r}", "MOE.18")
    experts_per_rank = experts // ranks
    tokens, slots, expert_of = assignment_order(ids)
    entries = np.stack([tokens, slots, expert_of], axis=-1).astype(np.int64)  # [tokens * K, 3]
    counts = np.bincount(expert_of // experts_per_rank, minlength=ranks)  # [ranks]
    offsets = np.concatenate([[0], np.cumsum(counts)])  # [ranks + 1]
    groups = np.sort(ids // (experts // config.n_group), axis=-1)  # [tokens, K]
    groups_per_token = 1 + (groups[:, 1:] != groups[:, :-1]).sum(axis=-1)  # [tokens]
    over = np.flatnonzero(groups_per_token > config.topk_group)
    if enforce_node_limit and over.size:
        token = int(over[0])
        raise InputError("expert_ids", f"token {token} reaches {int(groups_per_token[token])} groups {sorted(set(groups[token].tolist()))}, "
                         f"expected <= topk_group = {config.topk_group} (node-limited routing, groups = nodes)", "MOE.18")
    entries, counts, groups_per_token = emit(trace, "MOE.18", entries, counts, groups_per_token)
    return DispatchPlan(int(ranks), experts_per_rank, entries, counts, offsets, groups_per_token)
