"""TOLERANCE.4 — discrete choices judged by margin: ties, near ties and flips of expert routing, greedy tokens and DSA selections.

The reference breaks exact ties its own way (lower expert or group index, lowest token id).
A conforming implementation may pick any member of a tied optimum, and any choice whose score
falls below the optimum by no more than its profile's noise allows (the margin allowance).
Such a choice is accepted and everything after it is judged under it: the reference is re-run
forced to the candidate's routing or tokens, and that run is the truth the candidate's other
outputs and intermediates are compared with. A choice further below the optimum is a failure
that names the token and its margin. An MoE layer that returns no routing has its rows at
near-tie tokens compared with the reference under either routing, whichever is closer; a
failing model-level case is re-run with each near-tie routing decision of the truth flipped to
its runner-up (:func:`explaining_routing_flip`, a :class:`RoutingRecorder` carries the flip).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping

import numpy as np

from ..config import ModelConfig, from_dict
from ..moe import group_mask, group_scores, route
from ..spec import load_spec_file
from ..trace import Trace, storage_format
from . import reference_adapter
from .compare import Comparison, acceptance, compare_tensor, unit_roundoff
from .protocol import call, entry_points

NOTES_SHOWN = 4  # accepted flips named one by one in a report; the rest are counted
MAX_FLIPS_TRIED = 8  # near-tie decisions re-run, smallest margin first


@dataclasses.dataclass
class Judgement:
    """What the margin rule decided about a case's discrete outputs.

    ``outputs`` / ``steps`` replace the stored truth (the reference re-run under the candidate's
    accepted choices); ``comparisons`` are the verdicts on the discrete outputs themselves, whose
    names are in ``judged``; ``notes`` say what was accepted and why.
    """

    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    steps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def judged(self) -> set[str]:
        return {comparison.name for comparison in self.comparisons}


def margin_allowance(profile: str, noise_max: float, truth: np.ndarray, fmt: str) -> float:
    """TOLERANCE.4 — how far below the optimum a choice may score: factor x max(the emulation's largest error, floor).

    Two competing scores may each move by the emulation's largest error (``factor`` 2, spec/tolerance.yaml
    ``margins``); the floor (``floor_units`` unit roundoffs of ``fmt`` times the largest score) lets an
    independent float64 implementation differ from the reference in the last bits (fp64 noise is 0).
    """
    factor = float(load_spec_file("tolerance.yaml")["margins"]["factor"])
    floor = float(acceptance(profile)["floor_units"]) * unit_roundoff(profile, fmt) * float(np.max(np.abs(truth), initial=0.0))
    return factor * max(float(noise_max), floor)


def routing_deficits(config: ModelConfig, selection: np.ndarray, expert_ids: np.ndarray, group_allowed: float,
                     expert_allowed: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TOLERANCE.4 on MOE.4-MOE.7 — how far each token's expert set falls below an optimal routing of ``selection``.

    For every set of topk_group kept groups that holds the candidate's experts: the group deficit
    is how much the best dropped group outscores the worst kept one (MOE.4 group scores), the
    expert deficit how much the best unchosen expert outscores the worst chosen one after that
    group mask (MOE.6); the kept set most in the candidate's favour (smallest larger share of its
    allowance) is the one reported. Both are 0 for an optimal choice, ties included; inf when no
    kept set holds the candidate's experts. Returns group_deficit [tokens], expert_deficit
    [tokens], kept_groups [tokens, topk_group] (descending group score).
    """
    per_group = config.n_routed_experts // config.n_group
    scores_of_groups = group_scores(config, selection)  # [tokens, n_group]
    used = np.zeros(scores_of_groups.shape, dtype=bool)
    np.put_along_axis(used, expert_ids // per_group, True, axis=-1)
    chosen = np.zeros(selection.shape, dtype=bool)
    np.put_along_axis(chosen, expert_ids, True, axis=-1)
    tokens = selection.shape[0]
    best = (np.full(tokens, np.inf), np.full(tokens, np.inf), np.full(tokens, np.inf),
            np.zeros((tokens, config.topk_group), np.int64))  # share, group deficit, expert deficit, kept groups
    for combination in itertools.combinations(range(config.n_group), config.topk_group):
        kept = np.broadcast_to(np.array(combination), (tokens, config.topk_group))
        kept_mask = np.zeros(config.n_group, dtype=bool)
        kept_mask[list(combination)] = True
        holds = ~(used & ~kept_mask).any(axis=-1)  # [tokens]: every candidate expert in a kept group
        group_deficit = np.maximum(np.max(scores_of_groups[:, ~kept_mask], axis=-1, initial=-np.inf)
                                   - scores_of_groups[:, kept_mask].min(axis=-1), 0.0)
        masked = group_mask(config, selection, kept)  # [tokens, n_routed_experts]
        worst_chosen = np.where(chosen, masked, np.inf).min(axis=-1)
        best_other = np.where(chosen, -np.inf, masked).max(axis=-1)
        with np.errstate(invalid="ignore"):  # -inf - -inf: nothing finite competes
            expert_deficit = np.nan_to_num(np.maximum(best_other - worst_chosen, 0.0), nan=0.0)
        share = np.where(holds, np.maximum(_share(group_deficit, group_allowed), _share(expert_deficit, expert_allowed)), np.inf)
        better = share < best[0]
        best = tuple(np.where(better.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
                     for old, new in zip(best, (share, group_deficit, expert_deficit, kept)))
    _, group_deficit, expert_deficit, kept = best
    by_score = np.argsort(-np.take_along_axis(scores_of_groups, kept, axis=-1), axis=-1, kind="stable")
    return group_deficit, expert_deficit, np.take_along_axis(kept, by_score, axis=-1)


def _share(deficit: np.ndarray, allowed: float) -> np.ndarray:
    """deficit / allowed, with 0 / 0 = 0 (a tie under a zero allowance)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(deficit == 0, 0.0, deficit / allowed)


def token_deficits(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """TOLERANCE.4 on MODEL.6 — how far each chosen token's logit falls below the largest: 0 for the argmax, ties included."""
    return logits.max(axis=-1) - np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]


def judge_choices(entry: dict, case: dict, produced: Mapping, profile: str) -> Judgement:
    """TOLERANCE.4 — judge a case's discrete outputs by margin and give the truth the rest is compared with."""
    noise_max = entry["profiles"].get(profile, {}).get("noise_max", {})
    if entry["entry_point"] in ("moe_route", "moe_layer") and "expert_ids" in case["output"]:
        if "expert_ids" in produced:
            return _judge_routing(entry, case, produced, profile, noise_max)
        return _near_tie_rows(entry, case, produced, profile, noise_max)
    if entry["entry_point"] in SELECTIONS and "indices" in produced:
        return _judge_selection(entry, case, produced, profile, noise_max)
    judgement = _judge_tokens(entry, case, produced, profile, noise_max) if entry["entry_point"] in TOKEN_CHOICES else Judgement()
    if entry["entry_point"] in ("model_logits", "greedy_decode") and from_dict(entry["config"]).moe_layers:
        judgement = _with_routing_flip(entry, case, produced, profile, noise_max, judgement)
    return _next_token_on_judged_path(entry, judgement)


def _next_token_on_judged_path(entry: dict, judgement: Judgement) -> Judgement:
    """MODEL.6's stored intermediate ``next_token`` is the last step's choice: the judged path's, whichever rule judged the tokens."""
    if entry["entry_point"] == "greedy_decode" and "tokens" in judgement.outputs:
        judgement.steps["MODEL.6/next_token"] = judgement.outputs["tokens"][:, -1]
    return judgement


def _valid_ids(candidate, truth: np.ndarray, bound: int, distinct: bool) -> np.ndarray | None:
    """The candidate's ids as int64 when they have the truth's shape and lie in 0 .. bound - 1 (distinct per row), else None."""
    ids = np.asarray(candidate)
    if ids.shape != truth.shape or ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= bound)):
        return None
    ordered = np.sort(ids, axis=-1)
    if distinct and (ordered[..., 1:] == ordered[..., :-1]).any():
        return None
    return ids.astype(np.int64)


def _routing_allowances(config: ModelConfig, routing, profile: str, noise_max: dict) -> tuple[float, float]:
    """The margin allowances of the group and the expert decisions, from the noise of the scores they are made on."""
    selection_key = "step:MOE.3:selection" if config.has_correction_bias else "step:MOE.2:scores"
    expert_noise = noise_max.get(selection_key, noise_max.get("step:MOE.2:scores", 0.0))
    group_noise = noise_max.get("step:MOE.4:group_scores", expert_noise * (2 if config.group_rule == "top2_sum" else 1))
    expert_step, expert_name = selection_key.split(":")[1:]
    return (margin_allowance(profile, group_noise, routing.group_scores, storage_format(profile, "MOE.4", "group_scores")),
            margin_allowance(profile, expert_noise, routing.selection, storage_format(profile, expert_step, expert_name)))


def _rerun_layer(entry: dict, case: dict, expert_ids: np.ndarray) -> tuple[dict, Trace]:
    """The reference (float64) forced to ``expert_ids``, with its intermediates."""
    trace = Trace()
    return _rerun(entry, case, entry["entry_point"], trace, forced_expert_ids=expert_ids), trace


def _judge_routing(entry: dict, case: dict, produced: Mapping, profile: str, noise_max: dict) -> Judgement:
    """Expert sets by margin; the weights, the layer output and the intermediates under the candidate's accepted routing."""
    config = from_dict(entry["config"])
    truth_ids = case["output"]["expert_ids"]
    candidate = _valid_ids(produced["expert_ids"], truth_ids, config.n_routed_experts, distinct=True)
    if candidate is None:
        return Judgement()  # wrong shape, dtype or range: the exact comparison says so
    routing = route(config, case["weight"], case["input"]["hidden"])
    group_allowed, expert_allowed = _routing_allowances(config, routing, profile, noise_max)
    group_deficit, expert_deficit, kept_groups = routing_deficits(config, routing.selection, candidate, group_allowed, expert_allowed)
    flipped = np.any(np.sort(candidate, axis=-1) != np.sort(truth_ids, axis=-1), axis=-1)  # [tokens]
    within = (group_deficit <= group_allowed) & (expert_deficit <= expert_allowed)
    accepted, rejected = flipped & within, flipped & ~within
    judgement = Judgement()
    for token in np.flatnonzero(accepted)[:NOTES_SHOWN]:
        judgement.notes.append(f"token {token}: routed differently ({_routing_text(candidate, truth_ids, token)}) at margin "
                               f"{_margin_text(group_deficit, expert_deficit, group_allowed, expert_allowed, token, profile)}: "
                               "judged under the candidate's routing")
    if accepted.sum() > NOTES_SHOWN:
        judgement.notes.append(f"{int(accepted.sum()) - NOTES_SHOWN} more tokens routed differently within the {profile} allowance")
    comparison = Comparison("expert_ids", not rejected.any())
    if rejected.any():
        token = int(np.flatnonzero(rejected)[0])
        differing = int(sum(len(set(candidate[t]) - set(truth_ids[t])) for t in np.flatnonzero(rejected)))
        comparison.reason = (f"{int(rejected.sum())} of {len(truth_ids)} tokens routed differently beyond the {profile} margin allowance "
                             f"({differing} of {truth_ids.size} expert choices differ); token {token}: "
                             f"{_routing_text(candidate, truth_ids, token)} at margin "
                             f"{_margin_text(group_deficit, expert_deficit, group_allowed, expert_allowed, token, profile)}")
    judgement.comparisons.append(comparison)
    forced = np.where(rejected[:, None], truth_ids, candidate)  # the candidate's routing, in its order, wherever acceptable
    if not np.array_equal(forced, truth_ids):
        outputs, trace = _rerun_layer(entry, case, forced)
        judgement.outputs = {name: np.asarray(value) for name, value in outputs.items() if name != "expert_ids"}
        judgement.steps = _stored_steps(trace, case)
        _rebase_groups(config, judgement.steps, routing.selection, kept_groups, accepted)
    return judgement


def _rebase_groups(config: ModelConfig, steps: dict, selection: np.ndarray, kept_groups: np.ndarray, accepted: np.ndarray) -> None:
    """MOE.5 kept groups and the MOE.6 mask of accepted tokens as the candidate's groups make them (forcing moves only the experts)."""
    if "MOE.5/kept_groups" in steps:
        steps["MOE.5/kept_groups"] = np.where(accepted[:, None], kept_groups, steps["MOE.5/kept_groups"])
    if "MOE.6/masked" in steps:
        steps["MOE.6/masked"] = np.where(accepted[:, None], group_mask(config, selection, kept_groups), steps["MOE.6/masked"])


def _routing_text(candidate: np.ndarray, truth: np.ndarray, token: int) -> str:
    return f"experts {sorted(candidate[token].tolist())} instead of {sorted(truth[token].tolist())}"


def _margin_text(group_deficit, expert_deficit, group_allowed: float, expert_allowed: float, token: int, profile: str) -> str:
    """The deciding margin of one token against its allowance: the groups' if they differ, else the experts'."""
    if group_deficit[token] == 0 and expert_deficit[token] == 0:
        return "0 (an exact tie)"
    if _share(group_deficit[token], group_allowed) > _share(expert_deficit[token], expert_allowed):
        deficit, allowed, what = group_deficit[token], group_allowed, "group scores"
    else:
        deficit, allowed, what = expert_deficit[token], expert_allowed, "selection scores"
    relation = "within" if deficit <= allowed else "beyond"
    return f"{deficit:.3g} ({what}), {relation} the {profile} allowance {allowed:.3g}"


def _near_tie_rows(entry: dict, case: dict, produced: Mapping, profile: str, noise_max: dict) -> Judgement:
    """A layer that returns no routing: at tokens whose truth routing nearly ties (margin within the allowance), the
    truth row is the reference's under the truth routing or under the runner-up routing, whichever is closer to the
    candidate's row."""
    config = from_dict(entry["config"])
    candidate = np.asarray(produced.get("output"))
    truth = case["output"]["output"]
    if candidate.shape != truth.shape or candidate.dtype.kind not in "fiu":
        return Judgement()
    routing = route(config, case["weight"], case["input"]["hidden"])
    group_allowed, expert_allowed = _routing_allowances(config, routing, profile, noise_max)
    judgement, rows = Judgement(), truth.reshape(-1, truth.shape[-1]).copy()
    explained = []
    for near, alternative in ((routing.expert_margin <= expert_allowed, runner_up_experts(config, routing.masked, routing.expert_ids)),
                              (routing.group_margin <= group_allowed,
                               runner_up_groups(config, routing.group_scores, routing.selection, routing.expert_ids))):
        if not near.any():
            continue
        forced = np.where(near[:, None], alternative, routing.expert_ids)
        other = _rerun_layer(entry, case, forced)[0]["output"].reshape(rows.shape)
        flat = candidate.reshape(rows.shape).astype(np.float64)
        closer = near & (np.linalg.norm(flat - other, axis=-1) < np.linalg.norm(flat - rows, axis=-1))
        rows[closer] = other[closer]
        explained += [(int(t), float(min(routing.expert_margin[t], routing.group_margin[t]))) for t in np.flatnonzero(closer)]
    if explained:
        judgement.outputs["output"] = rows.reshape(truth.shape)
        judgement.notes += [f"token {token}: output closer to the runner-up routing (truth margin {margin:.3g}, within the {profile} "
                            "allowance): judged under it" for token, margin in explained[:NOTES_SHOWN]]
    return judgement


def runner_up_experts(config: ModelConfig, masked: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
    """Every token's routing with its K-th expert replaced by the (K+1)-th of the MOE.6 masked scores."""
    runner_up = np.argsort(-masked, axis=-1, kind="stable")[:, config.num_experts_per_tok]
    return np.concatenate([expert_ids[:, :-1], runner_up[:, None]], axis=-1)


def runner_up_groups(config: ModelConfig, scores_of_groups: np.ndarray, selection: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
    """Every token's routing with its last kept group replaced by the best dropped one (unchanged where every group is kept)."""
    if config.topk_group == config.n_group:
        return expert_ids
    order = np.argsort(-scores_of_groups, axis=-1, kind="stable")
    kept = np.concatenate([order[:, : config.topk_group - 1], order[:, config.topk_group: config.topk_group + 1]], axis=-1)
    return np.argsort(-group_mask(config, selection, kept), axis=-1, kind="stable")[:, : config.num_experts_per_tok]


# ------------------------------------------------------------------ DSA selections (DSA.10)

SELECTIONS = ("dsa_indexer", "dsa_prefill", "dsa_extend")  # entry points whose ``indices`` output is a DSA.10 selection


def selection_deficits(masked_scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """TOLERANCE.4 on DSA.10 — how far each query's selected set falls below an optimal one on the DSA.9 scores.

    ``masked_scores [batch, seq, keys]`` (-inf where a key is not visible), ``indices [batch, seq, selected]``
    (any order, -1 pads). Per query: the best unselected visible score minus the worst selected one, 0 for an
    optimal set (ties included); inf for a row that is no acceptable set (not min(selected, visible) distinct
    visible positions with -1 in the other slots). Returns ``[batch, seq]``.
    """
    keys = masked_scores.shape[-1]
    visible = np.isfinite(masked_scores)  # [batch, seq, keys]
    valid = indices >= 0
    in_range = (indices >= -1) & (indices < keys)
    chosen = np.zeros(masked_scores.shape[:2] + (keys + 1,), bool)  # the extra column takes the -1 slots
    np.put_along_axis(chosen, np.where(valid & in_range, indices, keys), True, axis=-1)
    chosen = chosen[..., :keys]
    acceptable = (in_range.all(axis=-1) & (chosen.sum(axis=-1) == valid.sum(axis=-1))  # distinct
                  & (valid.sum(axis=-1) == np.minimum(indices.shape[-1], visible.sum(axis=-1))) & ~(chosen & ~visible).any(axis=-1))
    worst_chosen = np.where(chosen, masked_scores, np.inf).min(axis=-1)
    best_other = np.where(chosen | ~visible, -np.inf, masked_scores).max(axis=-1)
    with np.errstate(invalid="ignore"):  # -inf - -inf or inf - inf: nothing competes
        deficit = np.nan_to_num(np.maximum(best_other - worst_chosen, 0.0), nan=0.0, posinf=np.inf)
    return np.where(acceptable, deficit, np.inf)


def ranked_selection(masked_scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Each row's selected set in DSA.10's rank order (descending score, ties to the lower position), -1 last: the
    order the reference is forced in, so that a candidate's order within a row changes no verdict."""
    keys = masked_scores.shape[-1]
    score = np.where(indices >= 0, np.take_along_axis(masked_scores, np.clip(indices, 0, keys - 1), axis=-1), -np.inf)
    order = np.lexsort((np.where(indices >= 0, indices, keys), -score), axis=-1)  # last key first: score, then position
    return np.take_along_axis(indices, order, axis=-1)


def _judge_selection(entry: dict, case: dict, produced: Mapping, profile: str, noise_max: dict) -> Judgement:
    """DSA selections by margin; the layer's outputs and intermediates under the candidate's accepted selection."""
    truth = case["output"]["indices"]
    candidate = np.asarray(produced["indices"])
    if candidate.shape != truth.shape or candidate.dtype.kind not in "iu":
        return Judgement()  # wrong shape or dtype: the exact comparison says so
    candidate = candidate.astype(np.int64)
    flipped = np.any(np.sort(candidate, axis=-1) != np.sort(truth, axis=-1), axis=-1)  # [batch, seq]
    if not flipped.any():
        return Judgement()
    scores = case["step"]["DSA.9/masked_scores"]  # [batch, seq, keys], the float64 truth's
    allowed = margin_allowance(profile, noise_max.get("step:DSA.9:masked_scores", 0.0), np.where(np.isfinite(scores), scores, 0.0),
                               storage_format(profile, "DSA.9", "masked_scores"))
    deficit = selection_deficits(scores, candidate)
    accepted, rejected = flipped & (deficit <= allowed), flipped & (deficit > allowed)
    judgement = Judgement()
    for b, t in np.argwhere(accepted)[:NOTES_SHOWN]:
        judgement.notes.append(f"sequence {b} query {t}: selected differently ({_selection_text(candidate, truth, b, t)}) at margin "
                               f"{_deficit_text(deficit[b, t], allowed, profile)}: judged under the candidate's selection")
    if accepted.sum() > NOTES_SHOWN:
        judgement.notes.append(f"{int(accepted.sum()) - NOTES_SHOWN} more queries selected differently within the {profile} allowance")
    comparison = Comparison("indices", not rejected.any())
    if rejected.any():
        b, t = (int(i) for i in np.argwhere(rejected)[0])
        comparison.reason = (f"{int(rejected.sum())} of {flipped.size} queries select keys beyond the {profile} margin allowance "
                             f"(DSA.10); sequence {b} query {t}: {_selection_text(candidate, truth, b, t)} at margin "
                             f"{_deficit_text(deficit[b, t], allowed, profile)}")
    judgement.comparisons.append(comparison)
    if not accepted.any():
        return judgement
    forced = np.where(accepted[..., None], ranked_selection(scores, candidate), truth)
    trace = Trace()
    outputs = _rerun(entry, case, entry["entry_point"], trace, forced_indices=forced)
    judgement.outputs = {name: np.asarray(value) for name, value in outputs.items() if name != "indices"}
    judgement.steps = _stored_steps(trace, case)
    return judgement


def _selection_text(candidate: np.ndarray, truth: np.ndarray, b: int, t: int) -> str:
    chosen, best = set(candidate[b, t].tolist()) - {-1}, set(truth[b, t].tolist()) - {-1}
    return f"keys {sorted(chosen - best)} instead of {sorted(best - chosen)}"


def _deficit_text(deficit: float, allowed: float, profile: str) -> str:
    if deficit == 0:
        return "0 (an exact tie)"
    if not np.isfinite(deficit):
        return "inf (not min(index_topk, visible) distinct visible keys)"
    return f"{deficit:.3g} (index scores), {'within' if deficit <= allowed else 'beyond'} the {profile} allowance {allowed:.3g}"


TOKEN_CHOICES = {  # entry point -> (its output of greedy choices, the reference keyword that forces them, the label of axis 1)
    "greedy_decode": ("tokens", "forced_tokens", "step"),
    "mtp_draft": ("drafts", "forced_drafts", "depth"),
    "speculative_decode": ("tokens", "forced_tokens", "step"),
}


def _rerun(entry: dict, case: dict, entry_point: str, trace: Trace | None = None, **forced: np.ndarray) -> dict:
    """The reference's ``entry_point`` on the case's arguments, forced to another implementation's choices."""
    available = {**case["input"], **entry["args"], "config": dict(entry["config"]), "weights": dict(case["weight"])}
    return call(getattr(reference_adapter, entry_point), entry_point, available, **forced, trace=trace)


def _stored_steps(trace: Trace, case: dict) -> dict[str, np.ndarray]:
    """The intermediates of a re-run (``trace``) that the case stores, keyed as it keys them (``STEP/tensor``)."""
    return {f"{step}/{name}": value for step, arrays in trace.steps.items() for name, value in arrays.items()
            if f"{step}/{name}" in case["step"]}


def _judge_tokens(entry: dict, case: dict, produced: Mapping, profile: str, noise_max: dict) -> Judgement:
    """Greedy tokens (and MTP drafts) by margin; the logits, drafts, acceptance counts and intermediates along the candidate's own tokens.

    Speculative decoding emits greedy decoding's tokens: their logits come from greedy decoding forced to them, the
    noise from the profile's emulation of that run (the case stores no logits).
    """
    name, keyword, axis = TOKEN_CHOICES[entry["entry_point"]]
    truth_tokens = case["output"][name]
    candidate = _valid_ids(produced[name], truth_tokens, int(entry["config"]["vocab_size"]), distinct=False)
    if candidate is None or np.array_equal(candidate, truth_tokens):
        return Judgement()
    judgement = Judgement()
    if entry["entry_point"] == "speculative_decode":
        logits = _rerun(entry, case, "greedy_decode", forced_tokens=candidate)["logits"]
        emulated = _rerun(entry, case, "greedy_decode", Trace(profile, keep=False), forced_tokens=candidate)["logits"]
        largest = float(np.max(np.abs(np.asarray(emulated, dtype=np.float64) - logits), initial=0.0))
        judgement.outputs = {key: value for key, value in _rerun(entry, case, "speculative_decode", forced_tokens=candidate).items()
                             if key != name}
    else:
        trace = Trace()
        judgement.outputs = _rerun(entry, case, entry["entry_point"], trace, **{keyword: candidate})
        judgement.steps = _stored_steps(trace, case)  # the last step's intermediates along the candidate's tokens
        logits, largest = judgement.outputs["logits"], noise_max.get("output:logits", 0.0)
    allowed = margin_allowance(profile, largest, logits, storage_format(profile, "MODEL.5", "logits"))
    _token_verdict(judgement, name, axis, candidate, logits, allowed, profile)
    return judgement


def _token_verdict(judgement: Judgement, name: str, axis: str, candidate: np.ndarray, logits: np.ndarray, allowed: float,
                   profile: str) -> None:
    """Add to ``judgement`` the verdict on greedy choices ``candidate [batch, n]`` given the truth's ``logits`` along them."""
    deficit = token_deficits(logits, candidate)  # [batch, n]
    own = np.argmax(logits, axis=-1)  # the reference's choice along the candidate's path
    flipped = candidate != own
    accepted, rejected = flipped & (deficit <= allowed), flipped & (deficit > allowed)
    judgement.outputs[name] = np.where(accepted, candidate, own)
    for b, k in np.argwhere(accepted)[:NOTES_SHOWN]:
        judgement.notes.append(f"sequence {b} {axis} {k}: token {candidate[b, k]} instead of {own[b, k]} at margin {deficit[b, k]:.3g}, "
                               f"within the {profile} allowance {allowed:.3g}: judged on the candidate's path")
    comparison = Comparison(name, not rejected.any())
    if rejected.any():
        b, k = (int(i) for i in np.argwhere(rejected)[0])
        comparison.reason = (f"{int(rejected.sum())} of {candidate.size} greedy choices not the argmax beyond the {profile} margin "
                             f"allowance; sequence {b} {axis} {k}: token {candidate[b, k]} instead of {own[b, k]} at margin "
                             f"{deficit[b, k]:.3g}, beyond the allowance {allowed:.3g}")
    judgement.comparisons.append(comparison)


def _with_routing_flip(entry: dict, case: dict, produced: Mapping, profile: str, noise_max: dict, judgement: Judgement) -> Judgement:
    """Model level: outputs that fail under the truth (along the candidate's accepted tokens) may be explained by one
    routing near tie flipped to its runner-up (:func:`explaining_routing_flip`); then they are judged under that run."""
    if all(c.passed for c in judgement.comparisons) and _outputs_pass(entry, produced, {**case["output"], **judgement.outputs}, profile):
        return judgement
    forced, greedy = {}, entry["entry_point"] == "greedy_decode"
    if greedy:
        tokens = _valid_ids(produced["tokens"], case["output"]["tokens"], int(entry["config"]["vocab_size"]), distinct=False)
        if tokens is None:
            return judgement
        forced["forced_tokens"] = tokens
    allowed = margin_allowance(profile, noise_max.get("output:logits", 0.0), case["output"]["logits"], storage_format(profile, "MODEL.5", "logits"))

    def explains(outputs: dict, trace: Trace) -> Judgement | None:
        flipped = Judgement(outputs=dict(outputs), steps=_stored_steps(trace, case), notes=[])
        if greedy:
            _token_verdict(flipped, "tokens", "step", forced["forced_tokens"], outputs["logits"], allowed, profile)
        passed = all(c.passed for c in flipped.comparisons) and _outputs_pass(entry, produced, flipped.outputs, profile)
        return flipped if passed else None

    found = explaining_routing_flip(entry, profile, lambda trace: _rerun(entry, case, entry["entry_point"], trace, **forced), explains)
    if found is None:
        return judgement
    flipped, note = found
    flipped.notes = [note] + flipped.notes
    return flipped


def _outputs_pass(entry: dict, produced: Mapping, truth: Mapping, profile: str) -> bool:
    """Whether every float output the candidate returned passes TOLERANCE.3 against ``truth``."""
    recorded = entry["profiles"].get(profile, {})
    output_steps = entry_points()[entry["entry_point"]]["output_steps"]
    return all(compare_tensor(name, produced[name], truth[name], recorded.get("noise", {}).get(f"output:{name}", 0.0), profile,
                              fmt=storage_format(profile, output_steps[name], name),
                              noise_max=recorded.get("noise_max", {}).get(f"output:{name}", 0.0)).passed
               for name in truth if name in produced and np.asarray(truth[name]).dtype.kind == "f")


# ------------------------------------------------------------------ routing near ties inside a model run

class RoutingRecorder(Trace):
    """A trace that records each MoE routing call of a run (MOE.3-MOE.7) and replaces the experts of chosen rows.

    ``overrides``: MOE.7 call index (in the order of the run) -> (rows, expert ids [rows, K]).
    ``precision``: emulate a profile as :class:`Trace` does (None: exact float64); ``keep``: keep the intermediates.
    """

    def __init__(self, precision: str | None = None, overrides: Mapping[int, tuple] | None = None, keep: bool = False) -> None:
        super().__init__(precision, keep=keep)
        self.overrides = dict(overrides or {})
        self.calls: list[dict[str, np.ndarray]] = []
        self._current: dict[str, np.ndarray] = {}

    def round(self, step_id: str, name: str, value: np.ndarray) -> np.ndarray:
        value = super().round(step_id, name, value)
        if step_id in ("MOE.3", "MOE.4", "MOE.6") or (step_id, name) == ("MOE.5", "group_margin"):
            self._current[name] = np.asarray(value)
        elif (step_id, name) == ("MOE.7", "expert_ids"):
            if len(self.calls) in self.overrides:
                rows, ids = self.overrides[len(self.calls)]
                value = np.array(value)
                value[rows] = ids
            self.calls.append({**self._current, "expert_ids": value})
        elif (step_id, name) == ("MOE.7", "expert_margin"):
            self.calls[-1]["expert_margin"] = np.asarray(value)
        return value


def explaining_routing_flip(entry: dict, profile: str, rerun: Callable[[Trace], dict],
                            explains: Callable[[dict, Trace], Judgement | None]) -> tuple[Judgement, str] | None:
    """``explains``' judgement of the first reference run with one near-tie routing decision flipped that it accepts, and a note
    (``explains`` gets the run's outputs and its trace, which keeps the run's intermediates).

    ``rerun(trace)`` runs the reference on the case (on the candidate's tokens if they were accepted).
    The allowances come from the profile's emulation of the same run, forced to the truth's routing.
    """
    config = from_dict(entry["config"])
    truth = RoutingRecorder()
    rerun(truth)
    if not truth.calls:
        return None
    emulation = RoutingRecorder(profile, {index: (slice(None), call["expert_ids"]) for index, call in enumerate(truth.calls)})
    rerun(emulation)
    expert_allowed, group_allowed = (
        margin_allowance(profile, max(float(np.max(np.abs(e[name] - t[name]), initial=0.0)) for e, t in zip(emulation.calls, truth.calls)),
                         np.concatenate([t[name].ravel() for t in truth.calls]), storage_format(profile, step, name))
        for step, name in (("MOE.3", "selection"), ("MOE.4", "group_scores")))
    for margin, allowed, index, row, ids in _near_ties(config, truth.calls, expert_allowed, group_allowed)[:MAX_FLIPS_TRIED]:
        flipped = RoutingRecorder(None, {index: ([row], ids[None])}, keep=True)
        judgement = explains(rerun(flipped), flipped)
        if judgement is not None:
            layers = config.moe_layers
            return judgement, (f"MoE layer {layers[index % len(layers)]}, forward {index // len(layers)}, token row {row}: routed to "
                             f"the runner-up (experts {sorted(ids.tolist())}; truth margin {margin:.3g}, within the {profile} "
                             f"allowance {allowed:.3g}) explains the candidate: judged under that routing")
    return None


def _near_ties(config: ModelConfig, calls: list[dict], expert_allowed: float, group_allowed: float) -> list[tuple]:
    """(margin, allowance, call index, row, runner-up expert ids) of every decision within its allowance, smallest margin first."""
    found = []
    for index, call in enumerate(calls):
        experts = runner_up_experts(config, call["masked"], call["expert_ids"])
        groups = runner_up_groups(config, call["group_scores"], call["selection"], call["expert_ids"])
        for margins, allowed, alternatives in ((call["expert_margin"], expert_allowed, experts), (call["group_margin"], group_allowed, groups)):
            found += [(float(margins[row]), allowed, index, int(row), alternatives[row]) for row in np.flatnonzero(margins <= allowed)]
    return sorted(found, key=lambda item: item[0])
