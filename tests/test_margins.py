"""TOLERANCE.4: ties and near ties of routing and greedy tokens are accepted by margin, flips at a clear margin are not."""

from __future__ import annotations


import numpy as np
import pytest

from mla_ref.config import from_dict, load_preset
from mla_ref.conformance import reference_adapter as ref
from mla_ref.conformance.margins import routing_deficits, runner_up_groups, token_deficits
from mla_ref.moe import group_mask, route, routing_weights
from mla_ref.trace import Trace
from golden_verdicts import case_args, verdict

PROFILES = ["fp64", "fp32", "tf32", "bf16", "fp16"]


pytestmark = pytest.mark.usefixtures("manifest_parsed_once")  # tests/conftest.py



def _top_k_higher_index_first(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best columns of each row, equal scores to the HIGHER index (torch.topk's measured CPU choice on ties),
    by a loop over the columns written independently of the reference's stable sort."""
    chosen = np.zeros((scores.shape[0], k), np.int64)
    for row, values in enumerate(scores):
        ranked = sorted(range(len(values)), key=lambda column: (values[column], column), reverse=True)
        chosen[row] = ranked[:k]
    return chosen


def torch_like_route(config, weights, hidden):
    """A router correct in every respect but its tie order: groups and experts tie toward the higher index."""
    cfg = from_dict(config)
    routing = route(cfg, weights, hidden)
    kept = _top_k_higher_index_first(routing.group_scores, cfg.topk_group)
    ids = _top_k_higher_index_first(group_mask(cfg, routing.selection, kept), cfg.num_experts_per_tok)
    return {"expert_ids": ids, "weights": routing_weights(cfg, routing.scores, ids)}


@pytest.mark.parametrize("profile", PROFILES)
def test_a_router_that_breaks_ties_toward_the_higher_index_passes(profile):
    case = verdict("moe.route.ties/", profile, moe_route=torch_like_route)
    assert case.status == "pass", case.reason
    assert case.notes and all("margin 0 " in note or "more tokens" in note for note in case.notes), case.notes
    truth = ref.moe_route(*case_args("moe.route.ties/"))["expert_ids"]
    candidate = torch_like_route(*case_args("moe.route.ties/"))["expert_ids"]
    assert (np.sort(truth, -1) != np.sort(candidate, -1)).any(axis=-1).sum() >= 3  # the case does test the tie order



def _swap_kth_at(config, weights, hidden, token: int):
    """The reference's routing with token ``token``'s K-th expert replaced by its (K+1)-th, weights consistent with it."""
    cfg = from_dict(config)
    routing = route(cfg, weights, hidden)
    ids = routing.expert_ids.copy()
    ids[token, -1] = np.argsort(-routing.masked[token], kind="stable")[cfg.num_experts_per_tok]
    return ids, routing_weights(cfg, routing.scores, ids), routing


@pytest.mark.parametrize("profile", ["fp32", "bf16"])
def test_a_flip_at_a_clear_margin_fails_and_names_token_and_margin(profile):
    config, weights, hidden = case_args("moe.route.v3/tiny")
    token = int(np.argmax(route(from_dict(config), weights, hidden).expert_margin))
    margin = float(route(from_dict(config), weights, hidden).expert_margin[token])

    def flipped(config, weights, hidden):
        ids, routed, _ = _swap_kth_at(config, weights, hidden, token)
        return {"expert_ids": ids, "weights": routed}
    case = verdict("moe.route.v3/", profile, moe_route=flipped)
    assert case.status == "fail"
    assert f"1 of {len(hidden)} tokens routed differently" in case.reason and f"token {token}:" in case.reason, case.reason
    assert f"at margin {margin:.3g}" in case.reason and f"beyond the {profile} allowance" in case.reason, case.reason
    assert f"(1 of {len(hidden) * from_dict(config).num_experts_per_tok} expert choices differ)" in case.reason  # not every slot


def _near_tie_flip(config, weights, hidden):
    """The reference's routing with the K-th and (K+1)-th experts exchanged at every token whose expert margin is < 2e-3."""
    cfg = from_dict(config)
    routing = route(cfg, weights, hidden)
    ids = routing.expert_ids.copy()
    near = np.flatnonzero(routing.expert_margin < 2e-3)
    for token in near:
        ids[token, -1] = np.argsort(-routing.masked[token], kind="stable")[cfg.num_experts_per_tok]
    return ids, near


@pytest.mark.parametrize("profile, accepted", [("fp32", False), ("bf16", True)])
def test_a_near_tie_flip_in_a_layer_is_judged_under_the_candidates_routing(profile, accepted):
    def layer(config, weights, hidden, layer, with_ids=True):
        ids, near = _near_tie_flip(config, weights, hidden)
        assert len(near) == 3
        output = ref.moe_layer(config, weights, hidden, layer, forced_expert_ids=ids)["output"]
        return {"output": output, "expert_ids": ids} if with_ids else {"output": output}
    case = verdict("moe.layer.neartie/", profile, moe_layer=layer)
    assert (case.status == "pass") == accepted, case.reason
    assert accepted == any("judged under the candidate's routing" in note for note in case.notes)
    without_ids = verdict("moe.layer.neartie/", profile, moe_layer=lambda *args: layer(*args, with_ids=False))
    assert (without_ids.status == "pass") == accepted, without_ids.reason
    assert accepted == any("runner-up routing" in note for note in without_ids.notes)


def test_a_wrong_layer_at_a_near_tie_still_fails():
    def layer(config, weights, hidden, layer):
        ids, _ = _near_tie_flip(config, weights, hidden)
        output = ref.moe_layer(config, dict(weights, **{"mlp.shared_experts.down_proj.weight": 0 * weights["mlp.shared_experts.down_proj.weight"]}),
                               hidden, layer, forced_expert_ids=ids)["output"]  # the shared expert dropped
        return {"output": output, "expert_ids": ids}
    assert verdict("moe.layer.neartie/", "bf16", moe_layer=layer).status == "fail"


@pytest.mark.parametrize("profile", ["fp64", "bf16"])
@pytest.mark.parametrize("bug", ["group_max_instead_of_top2_sum", "bias_in_the_weights", "zero_group_fill"])
def test_routing_bugs_are_still_rejected(profile, bug):
    def buggy(config, weights, hidden):
        cfg = from_dict(config)
        if bug == "group_max_instead_of_top2_sum":
            cfg = cfg.replace(group_score_rule="max")
        if bug == "zero_group_fill":
            cfg = cfg.replace(group_mask_fill="zero")
        routing = route(cfg, weights, hidden)
        scores = routing.selection if bug == "bias_in_the_weights" else routing.scores
        return {"expert_ids": routing.expert_ids, "weights": routing_weights(cfg, scores, routing.expert_ids)}
    case = verdict("moe.route.v3/tiny", profile, moe_route=buggy)
    assert case.status == "fail", case.reason


def _greedy_other_token_at_smallest_margin(config, weights, prompt_tokens, prompt_lengths, steps):
    """Greedy decoding that takes the runner-up token at the step of smallest top-2 margin, then continues greedily on its own path."""
    truth = ref.greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps)
    best_two = np.sort(truth["logits"], axis=-1)[..., -2:]
    sequence, step = np.unravel_index(np.argmin(best_two[..., 1] - best_two[..., 0]), best_two.shape[:2])
    tokens = truth["tokens"].copy()
    tokens[sequence, step] = np.argsort(truth["logits"][sequence, step], kind="stable")[-2]
    for later in range(step + 1, steps):  # its own greedy choice after the flip
        logits = ref.greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps, forced_tokens=tokens)["logits"]
        tokens[sequence, later] = np.argmax(logits[sequence, later])
    logits = ref.greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps, forced_tokens=tokens)["logits"]
    return {"tokens": tokens, "logits": logits}


@pytest.mark.parametrize("profile, accepted", [("fp64", False), ("fp32", False), ("bf16", True)])
def test_greedy_other_token_at_the_near_tie_is_judged_on_its_own_path(profile, accepted):
    case = verdict("model.greedy/", profile, greedy_decode=_greedy_other_token_at_smallest_margin)
    assert (case.status == "pass") == accepted, case.reason
    if accepted:
        assert any("judged on the candidate's path" in note and "margin 0.0138" in note for note in case.notes), case.notes
    else:
        assert "sequence 1 step 0" in case.reason and "margin 0.0138" in case.reason, case.reason


@pytest.mark.parametrize("offset, accepted", [(0, True), (1, False)])
def test_greedy_next_token_intermediate_is_judged_on_the_same_path(offset, accepted):
    """MODEL.6/next_token (the last step's choice) follows the accepted path: the candidate's own last token passes, another fails."""
    def with_next_token(*args):
        result = _greedy_other_token_at_smallest_margin(*args)
        return {**result, "MODEL.6/next_token": result["tokens"][:, -1] + offset}
    case = verdict("model.greedy/", "bf16", greedy_decode=with_next_token)
    assert (case.status == "pass") == accepted, case.reason
    if not accepted:
        assert "MODEL.6/next_token" in case.reason, case.reason


GREEDY_INTERMEDIATES = (("MODEL.1", "hidden"), ("MODEL.2", "hidden"), ("MODEL.3", "hidden"), ("MODEL.4", "post_norm_hidden"),
                        ("MODEL.5", "logits"))  # the last step's, as greedy decoding's cases store them


def test_greedy_intermediates_are_judged_on_the_accepted_path():
    """A candidate that takes the runner-up token at a near tie (bf16, before the last step) and returns its last step's
    intermediates MODEL.1-MODEL.5 along its own tokens passes: they are compared with the reference forced to its tokens
    (TOLERANCE.4), not with the truth's path, whose last step read another token."""
    def with_intermediates(config, weights, prompt_tokens, prompt_lengths, steps):
        result = _greedy_other_token_at_smallest_margin(config, weights, prompt_tokens, prompt_lengths, steps)
        trace = Trace()
        ref.greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps, forced_tokens=result["tokens"], trace=trace)
        return {**result, **{f"{step}/{name}": trace.steps[step][name] for step, name in GREEDY_INTERMEDIATES}}
    args = case_args("model.greedy/")
    truth, flipped = ref.greedy_decode(*args)["tokens"], _greedy_other_token_at_smallest_margin(*args)["tokens"]
    assert (truth[:, :-1] != flipped[:, :-1]).any()  # the flip reaches the last step's input: its intermediates differ
    case = verdict("model.greedy/", "bf16", greedy_decode=with_intermediates)
    assert case.status == "pass", case.reason
    assert {"MODEL.1/hidden", "MODEL.5/logits"} <= {c.name for c in case.comparisons}


def test_greedy_path_still_checks_the_logits():
    def wrong_logits(*args):
        result = _greedy_other_token_at_smallest_margin(*args)
        return {"tokens": result["tokens"], "logits": result["logits"][:, ::-1]}  # each step given another step's logits
    assert verdict("model.greedy/", "bf16", greedy_decode=wrong_logits).status == "fail"


def test_routing_deficits_measure_the_margin_of_a_swap():
    config = load_preset("tiny")
    rng = np.random.default_rng(3)
    routing = route(config, {"mlp.gate.weight": np.eye(config.n_routed_experts, config.hidden_size),
                             "mlp.gate.e_score_correction_bias": np.zeros(config.n_routed_experts)},
                    rng.standard_normal((40, config.hidden_size)))
    selection = routing.selection
    group_deficit, expert_deficit, kept = routing_deficits(config, selection, routing.expert_ids, 1.0, 1.0)
    assert not group_deficit.any() and not expert_deficit.any()  # the reference's own choice is optimal
    assert np.array_equal(np.sort(kept, -1), np.sort(routing.kept_groups, -1))
    swapped = routing.expert_ids.copy()
    swapped[:, -1] = np.argsort(-routing.masked, axis=-1, kind="stable")[:, config.num_experts_per_tok]
    group_deficit, expert_deficit, _ = routing_deficits(config, selection, swapped, 1.0, 1.0)
    worse = np.maximum(group_deficit, expert_deficit)  # the truth's kept groups are one way to hold the swapped set,
    assert (worse <= routing.expert_margin + 1e-15).all()  # so its deficit is at most the margin, and equal to it
    spans_every_kept_group = np.array([len(set(row // (config.n_routed_experts // config.n_group))) == config.topk_group for row in swapped])
    assert spans_every_kept_group.sum() >= 10  # where no other kept groups can hold the set
    np.testing.assert_allclose(expert_deficit[spans_every_kept_group], routing.expert_margin[spans_every_kept_group], rtol=0, atol=1e-15)
    logits = rng.standard_normal((3, 5, 11))
    assert not token_deficits(logits, np.argmax(logits, -1)).any()
    second = np.argsort(logits, -1)[..., -2]
    best_two = np.sort(logits, -1)[..., -2:]
    np.testing.assert_array_equal(token_deficits(logits, second), best_two[..., 1] - best_two[..., 0])


def _draft_other_token_at_smallest_margin(config, weights, prompt_tokens, prompt_lengths):
    """MTP drafting that takes the runner-up at the (sequence, depth) of smallest top-2 margin, its own argmax at later depths."""
    truth = ref.mtp_draft(config, weights, prompt_tokens, prompt_lengths)
    best_two = np.sort(truth["logits"], axis=-1)[..., -2:]
    sequence, depth = np.unravel_index(np.argmin(best_two[..., 1] - best_two[..., 0]), best_two.shape[:2])
    drafts = truth["drafts"].copy()
    drafts[sequence, depth] = np.argsort(truth["logits"][sequence, depth], kind="stable")[-2]
    for later in range(depth + 1, drafts.shape[1]):
        logits = ref.mtp_draft(config, weights, prompt_tokens, prompt_lengths, forced_drafts=drafts)["logits"]
        drafts[sequence, later] = np.argmax(logits[sequence, later])
    return {"drafts": drafts, "logits": ref.mtp_draft(config, weights, prompt_tokens, prompt_lengths, forced_drafts=drafts)["logits"]}


@pytest.mark.parametrize("profile, accepted", [("fp32", False), ("bf16", True)])
def test_an_mtp_draft_at_a_near_tie_is_judged_on_its_own_path(profile, accepted):
    """mtp.draft.recurrent: sequence 1's first draft has a top-2 margin of 0.059, within the bf16 allowance; depths 2 and 3
    then follow the candidate's draft."""
    case = verdict("mtp.draft.recurrent/", profile, mtp_draft=_draft_other_token_at_smallest_margin)
    assert (case.status == "pass") == accepted, case.reason
    assert accepted or "sequence 1 depth 0" in case.reason, case.reason


def _speculative_on_a_flipped_path(config, weights, prompt_tokens, prompt_lengths, steps):
    """Speculative decoding whose main model takes the runner-up at greedy decoding's smallest margin: its tokens and
    acceptance counts, the drafts being the reference's along that path."""
    tokens = _greedy_other_token_at_smallest_margin(config, weights, prompt_tokens, prompt_lengths, steps)["tokens"]
    return ref.speculative_decode(config, weights, prompt_tokens, prompt_lengths, steps, forced_tokens=tokens)


@pytest.mark.slow
@pytest.mark.parametrize("profile, accepted", [("fp32", False), ("bf16", True)])
def test_speculative_tokens_at_a_near_tie_are_judged_on_their_own_path(profile, accepted):
    """mtp.speculative.accepting: greedy's smallest margin (0.30) is within the bf16 allowance; on the flipped path
    the drafts are accepted differently (12, 5, 1 of 16 instead of 12, 6, 1 of 17): the counts are judged on that path."""
    select = "mtp.speculative.accepting/"
    case = verdict(select, profile, speculative_decode=_speculative_on_a_flipped_path)
    assert (case.status == "pass") == accepted, case.reason
    assert accepted == any("judged on the candidate's path" in note for note in case.notes)
    reference, flipped = ref.speculative_decode(*case_args(select)), _speculative_on_a_flipped_path(*case_args(select))
    assert not np.array_equal(reference["proposed_per_depth"], flipped["proposed_per_depth"])

    def counts_of_the_reference_path(*args):  # the flipped tokens with the acceptance counts of the reference's own path
        return {**ref.speculative_decode(*args), "tokens": _speculative_on_a_flipped_path(*args)["tokens"]}
    assert verdict(select, profile, speculative_decode=counts_of_the_reference_path).status == "fail"


@pytest.mark.parametrize("profile", ["tf32", "bf16", "fp16"])
def test_the_emulations_own_routing_flips_are_within_the_allowance(profile):
    """The reference's emulation of a profile is a correct implementation of it: every token it routes differently
    from the truth (20000 random tokens, tiny V3-style router) must be within TOLERANCE.4's allowance."""
    from mla_ref.conformance.margins import margin_allowance
    from mla_ref.golden.cases import _gate_weights
    from mla_ref.trace import Trace, storage_format
    config = load_preset("tiny")
    weights = _gate_weights({"id": "margins", "seed": 5, "layout": {}}, config, 1, experts=False)
    hidden = np.random.default_rng(5).standard_normal((20000, config.hidden_size))
    truth, trace = route(config, weights, hidden), Trace(profile)
    emulated = route(config, weights, hidden, trace=trace)
    flipped = np.any(np.sort(emulated.expert_ids, -1) != np.sort(truth.expert_ids, -1), axis=-1)
    allowed_experts = margin_allowance(profile, np.abs(trace["MOE.3"]["selection"] - truth.selection).max(), truth.selection,
                                       storage_format(profile, "MOE.3", "selection"))
    allowed_groups = margin_allowance(profile, np.abs(trace["MOE.4"]["group_scores"] - truth.group_scores).max(), truth.group_scores,
                                      storage_format(profile, "MOE.4", "group_scores"))
    group_deficit, expert_deficit, _ = routing_deficits(config, truth.selection, emulated.expert_ids, allowed_groups, allowed_experts)
    assert flipped.sum() >= 3, "no flips: the test would prove nothing"
    assert (expert_deficit[flipped] <= allowed_experts).all() and (group_deficit[flipped] <= allowed_groups).all()


def _model_routing_decisions(select: str, entry_point: str, profile: str):
    """Every routing decision of the truth run, smallest margin first, and the profile's expert / group allowances
    measured here from its emulation forced to the truth's routing (2 x the largest score error)."""
    from mla_ref.conformance.margins import RoutingRecorder, _near_ties
    args = case_args(select)
    truth = RoutingRecorder()
    getattr(ref, entry_point)(*args, trace=truth)
    emulation = RoutingRecorder(profile, {i: (slice(None), call["expert_ids"]) for i, call in enumerate(truth.calls)})
    getattr(ref, entry_point)(*args, trace=emulation)
    allowed = [2 * max(np.abs(e[name] - t[name]).max() for e, t in zip(emulation.calls, truth.calls)) for name in ("selection", "group_scores")]
    return args, _near_ties(from_dict(args[0]), truth.calls, np.inf, np.inf), allowed


def test_next_token_follows_the_path_of_a_model_level_routing_flip():
    """dsa.greedy bf16: a routing flip within the allowance that changes the last greedy token is explained by the flip
    search, and the last step's intermediates MODEL.1-MODEL.6 are judged on that path too: the candidate's own pass (that an
    intermediate next_token is compared at all: test_greedy_next_token_intermediate_is_judged_on_the_same_path)."""
    args, decisions, allowed = _model_routing_decisions("dsa.greedy/tiny-dsa/", "greedy_decode", "bf16")
    truth_last = ref.greedy_decode(*args)["tokens"][:, -1]
    changing = next(d for d in decisions if d[0] <= min(allowed)
                    and (_greedy_with_routing_flip(d)(*args)["tokens"][:, -1] != truth_last).any())

    def with_intermediates(*args):
        from mla_ref.conformance.margins import RoutingRecorder
        _, _, index, row, ids = changing
        trace = RoutingRecorder(None, {index: ([row], ids[None])}, keep=True)
        result = ref.greedy_decode(*args, trace=trace)
        return {**result, **{f"{step}/{name}": trace.steps[step][name] for step, name in GREEDY_INTERMEDIATES},
                "MODEL.6/next_token": result["tokens"][:, -1]}
    case = verdict("dsa.greedy/tiny-dsa/", "bf16", greedy_decode=with_intermediates)
    assert case.status == "pass", case.reason
    assert any("routed to the runner-up" in note for note in case.notes), case.notes
    assert {"MODEL.2/hidden", "MODEL.6/next_token"} <= {c.name for c in case.comparisons}


def _greedy_with_routing_flip(decision):
    """Greedy decoding by the reference with one routing decision (margin, allowance, call, row, runner-up ids) flipped."""
    _, _, index, row, ids = decision

    def greedy(*args):
        from mla_ref.conformance.margins import RoutingRecorder
        return ref.greedy_decode(*args, trace=RoutingRecorder(None, {index: ([row], ids[None])}))
    return greedy


def test_a_model_level_routing_flip_within_the_allowance_is_explained_and_one_beyond_fails():
    """fp16 model.greedy: the smallest routing margin of the run (prefill, 1.8e-3) is within the allowance, a flip there moves
    the logits far past the fp16 bound, and the checker finds the flip; a flip beyond the allowance stays a failure."""
    _, decisions, (expert_allowed, group_allowed) = _model_routing_decisions("model.greedy/", "greedy_decode", "fp16")
    within = [d for d in decisions if d[0] <= min(expert_allowed, group_allowed)]
    beyond = [d for d in decisions if d[0] > max(expert_allowed, group_allowed)]
    assert within and beyond
    case = verdict("model.greedy/", "fp16", greedy_decode=_greedy_with_routing_flip(within[0]))
    assert case.status == "pass", case.reason
    assert any(f"token row {within[0][3]}" in note and f"truth margin {within[0][0]:.3g}" in note for note in case.notes), case.notes
    assert verdict("model.greedy/", "fp32", greedy_decode=_greedy_with_routing_flip(within[0])).status == "fail"
    failures = [verdict("model.greedy/", "fp16", greedy_decode=_greedy_with_routing_flip(d)).status == "fail" for d in beyond[:3]]
    assert any(failures)  # a flip at a clear margin that moves the logits is not explained away


def test_a_layer_output_of_the_wrong_shape_without_routing_fails_on_its_shape():
    """No expert ids returned: the near-tie rows rule needs the output's shape; another shape is reported, not judged by row."""
    def layer(config, weights, hidden, layer):
        return {"output": ref.moe_layer(config, weights, hidden, layer)["output"][:-1]}
    case = verdict("moe.layer.neartie/", "bf16", moe_layer=layer)
    assert (case.status, case.reason, case.notes) == ("fail", "output: shape [9, 64], expected [10, 64]", [])


def test_with_every_group_kept_the_runner_up_group_routing_is_the_routing_itself():
    """topk_group == n_group: no group is dropped, so no dropped group can replace the last kept one."""
    config = load_preset("tiny").replace(topk_group=load_preset("tiny").n_group)
    rng = np.random.default_rng(0)
    selection = rng.standard_normal((5, config.n_routed_experts))
    ids = np.argsort(-selection, axis=-1)[:, : config.num_experts_per_tok]
    assert np.array_equal(runner_up_groups(config, rng.standard_normal((5, config.n_group)), selection, ids), ids)


def test_an_expert_chosen_twice_fails_the_exact_comparison_and_is_not_judged_by_margin():
    """K distinct experts per token (MOE.7): a repeated id is no routing the margin rule could accept, so expert_ids fail
    their exact comparison (the reference cannot be forced to it)."""
    def repeated(config, weights, hidden):
        out = ref.moe_route(config, weights, hidden)
        ids = np.array(out["expert_ids"])
        ids[0, -1] = ids[0, 0]
        return {"expert_ids": ids, "weights": out["weights"]}
    case = verdict("moe.route.v3/tiny/seed0", "bf16", moe_route=repeated)
    assert (case.status, case.reason, case.notes) == ("fail", "expert_ids: 1 of 72 values differ (exact comparison)", [])
