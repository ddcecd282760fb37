"""A second, slow reading of spec/moe.yaml, one token at a time, for cross-checking mla_ref.

Written apart from mla_ref on purpose: plain Python lists and the math module, ranking by
sorting ``(-score, index)`` tuples, experts evaluated per token and per slot, losses and the
dispatch plan counted with explicit loops. It imports nothing from mla_ref except through the
config object it is given.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def _logistic(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    ez = math.exp(z)
    return ez / (1.0 + ez)


def token_scores(config, gate_weight, x) -> tuple[list[float], list[float]]:
    """Logits and scores of one token: ``(logits, scores)`` as Python lists."""
    logits = [math.fsum(float(w) * float(v) for w, v in zip(row, x)) for row in gate_weight]
    if config.scoring_func == "sigmoid":
        return logits, [_logistic(z) for z in logits]
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = math.fsum(exps)
    return logits, [e / total for e in exps]


# How the released gates score a group, by topk_method (HF modeling_deepseek): V2's group_limited_greedy takes the
# group's best score, V3's noaux_tc the sum of its two best biased scores; greedy has a single group.
RELEASED_GROUP_SCORE = {"greedy": "best", "group_limited_greedy": "best", "noaux_tc": "two best"}


def group_score_of(config, members_descending: list[float]) -> float:
    """A group's score from the raw config fields: group_score_rule when set, else the released rule of topk_method."""
    explicit = {"max": "best", "top2_sum": "two best", None: None}[config.group_score_rule]
    rule = explicit or RELEASED_GROUP_SCORE[config.topk_method]
    return members_descending[0] if rule == "best" else sum(members_descending[:2])  # a one-expert group: its only score


def select_token(config, scores, bias) -> dict:
    """Routing of one token from its unbiased scores (MOE.3-MOE.8 read independently)."""
    n_experts = config.n_routed_experts
    size = n_experts // config.n_group
    chooser = [float(scores[e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(n_experts)]
    group_value = [group_score_of(config, sorted(chooser[g * size:(g + 1) * size], reverse=True)) for g in range(config.n_group)]
    ranked_groups = [g for _, g in sorted((-value, g) for g, value in enumerate(group_value))]
    kept = ranked_groups[: config.topk_group]
    if config.topk_group < config.n_group:
        group_margin = group_value[kept[-1]] - group_value[ranked_groups[config.topk_group]]
    else:
        group_margin = math.inf
    fill = -math.inf if config.group_mask_fill == "-inf" else 0.0
    candidates = [chooser[e] if e // size in kept else fill for e in range(n_experts)]
    ranked = [e for _, e in sorted((-value, e) for e, value in enumerate(candidates))]
    k = config.num_experts_per_tok
    ids = ranked[:k]
    if k < n_experts and candidates[ranked[k]] != -math.inf:
        expert_margin = candidates[ranked[k - 1]] - candidates[ranked[k]]
    else:
        expert_margin = math.inf
    gates = [float(scores[e]) for e in ids]
    if config.topk_norm_rule == "norm_topk_prob":
        renormalise = config.norm_topk_prob
    else:
        renormalise = config.scoring_func == "sigmoid"
    if renormalise:
        denominator = sum(gates) + config.topk_norm_epsilon
        gates = [v / denominator for v in gates]
    gates = [v * config.routed_scaling_factor for v in gates]
    return {"ids": ids, "weights": gates, "kept_groups": kept, "group_margin": group_margin,
            "expert_margin": expert_margin, "group_scores": group_value, "masked": candidates}


def route_token(config, gate_weight, bias, x) -> dict:
    """Everything of :func:`select_token` plus the logits and scores, from the token's hidden vector."""
    logits, scores = token_scores(config, gate_weight, x)
    result = select_token(config, scores, bias)
    result.update(logits=logits, scores=scores)
    return result


def _swiglu_vector(x, w_gate, w_up, w_down):
    gate = w_gate @ x
    up = w_up @ x
    inner = np.array([g * _logistic(g) * u for g, u in zip(gate.tolist(), up.tolist())])
    return w_down @ inner


def layer_token(config, tensors, x, ids, gates, moe: bool):
    """The feed-forward output of one token given its routing (``ids``, ``gates``); ``tensors`` relative to the layer."""
    if not moe:
        return _swiglu_vector(x, tensors["mlp.gate_proj.weight"], tensors["mlp.up_proj.weight"], tensors["mlp.down_proj.weight"])
    total = np.zeros(config.hidden_size)
    for expert, gate in zip(ids, gates):
        prefix = f"mlp.experts.{expert}."
        total = total + gate * _swiglu_vector(x, tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"],
                                              tensors[prefix + "down_proj.weight"])
    if config.n_shared_experts:
        total = total + _swiglu_vector(x, tensors["mlp.shared_experts.gate_proj.weight"], tensors["mlp.shared_experts.up_proj.weight"],
                                       tensors["mlp.shared_experts.down_proj.weight"])
    return total


def load_counts(config, expert_ids) -> list[int]:
    counts = [0] * config.n_routed_experts
    for row in expert_ids:
        for expert in row:
            counts[int(expert)] += 1
    return counts


def updated_bias(config, bias, load, gamma) -> list[float]:
    """Overloaded (load above the exact mean) down by gamma, underloaded up, equal unchanged."""
    mean = Fraction(sum(int(c) for c in load), len(load))
    result = []
    for b, c in zip(bias, load):
        if c > mean:
            result.append(float(b) - gamma)
        elif c < mean:
            result.append(float(b) + gamma)
        else:
            result.append(float(b))
    return result


def _frequency(config, sequence_choices, seq_len):
    counts = [0] * config.n_routed_experts
    for chosen in sequence_choices:
        for expert in chosen:
            counts[int(expert)] += 1
    scale = config.n_routed_experts / (config.num_experts_per_tok * seq_len)
    return [scale * c for c in counts]


def sequence_loss(config, scores, expert_ids, indicator, alpha) -> list[float]:
    """V3R eqs. 17-20 per sequence; ``scores [batch][seq][experts]``."""
    losses = []
    for b, sequence in enumerate(scores):
        if indicator == "unbiased_topk":
            choices = [[e for _, e in sorted((-float(v), e) for e, v in enumerate(row))][: config.num_experts_per_tok]
                       for row in sequence]
        else:
            choices = expert_ids[b]
        f = _frequency(config, choices, len(sequence))
        p = [0.0] * config.n_routed_experts
        for row in sequence:
            total = math.fsum(float(v) for v in row)
            for e, v in enumerate(row):
                p[e] += float(v) / total / len(sequence)
        losses.append(alpha * math.fsum(fi * pi for fi, pi in zip(f, p)))
    return losses


def v2_losses(config, scores, expert_ids, devices, max_devices, alphas) -> list[tuple[float, float, float]]:
    """V2R section 2.2.3 per sequence: ``(expert_loss, device_loss, comm_loss)``."""
    per_device = config.n_routed_experts // devices
    results = []
    for b, sequence in enumerate(scores):
        seq_len = len(sequence)
        f = _frequency(config, expert_ids[b], seq_len)
        p = [math.fsum(float(row[e]) for row in sequence) / seq_len for e in range(config.n_routed_experts)]
        expert_loss = alphas[0] * math.fsum(fi * pi for fi, pi in zip(f, p))
        device_loss, comm_loss = 0.0, 0.0
        for d in range(devices):
            members = range(d * per_device, (d + 1) * per_device)
            f_dev = math.fsum(f[e] for e in members) / per_device
            p_dev = math.fsum(p[e] for e in members)
            tokens_sent = sum(1 for chosen in expert_ids[b] if any(int(e) // per_device == d for e in chosen))
            f_comm = devices / (max_devices * seq_len) * tokens_sent
            device_loss += alphas[1] * f_dev * p_dev
            comm_loss += alphas[2] * f_comm * p_dev
        results.append((expert_loss, device_loss, comm_loss))
    return results


def dispatch(config, expert_ids, ranks) -> tuple[list[list[tuple[int, int, int]]], list[int]]:
    """Per rank, the (token, slot, expert) triples it receives, ordered by expert, token, slot; and per-token group counts."""
    per_rank = config.n_routed_experts // ranks
    per_group = config.n_routed_experts // config.n_group
    lists = []
    for rank in range(ranks):
        triples = [(int(e), t, s) for t, row in enumerate(expert_ids) for s, e in enumerate(row) if int(e) // per_rank == rank]
        lists.append([(t, s, e) for e, t, s in sorted(triples)])
    groups = [len({int(e) // per_group for e in row}) for row in expert_ids]
    return lists, groups


# ---------------------------------------------------------------------------- test support
# Small configs for the MoE tests (attention fields at their minimum; they play no part here).

def small_config(**moe_fields):
    """A valid tiny ModelConfig: layer 0 dense, layer 1 MoE unless overridden; MoE fields from ``moe_fields``."""
    from mla_ref.config import from_dict

    values = {"name": "moe-test", "vocab_size": 11, "hidden_size": 6, "num_hidden_layers": 2,
              "max_position_embeddings": 64, "num_attention_heads": 1, "kv_lora_rank": 4,
              "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2, "intermediate_size": 7,
              "moe_intermediate_size": 3, "n_routed_experts": 8, "num_experts_per_tok": 2,
              "first_k_dense_replace": 1}
    values.update(moe_fields)
    return from_dict(values)
