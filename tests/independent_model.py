"""An independent, deliberately slow float64 oracle for the decoder stack, the MTP chain, its losses and MTP drafts.

Test oracle only, written from the facts sheet (sections 2, 6 and 8) and V3R eqs. 21-25, not from
mla_ref: one sequence and one position at a time, Python lists of vectors, routing by sorting
``(-score, index)`` tuples, log-softmax with ``math.fsum``. Attention is the independent slow MLA
of tests/independent_mla.py. Nothing here imports mla_ref; ``weights`` is the full model dict
under Hugging Face names and ``config`` any object with the config fields read here.
"""

from __future__ import annotations

import math

import numpy as np

from independent_mla import slow_mla


def _norm(vector, gain, eps):
    mean_square = math.fsum(float(v) * float(v) for v in vector) / len(vector)
    return np.array([float(v) / math.sqrt(mean_square + eps) * float(g) for v, g in zip(vector, gain)])


def _logistic(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _swiglu(x, gate_w, up_w, down_w):
    inner = [_logistic(float(g)) * float(g) * float(u) for g, u in zip(gate_w @ x, up_w @ x)]
    return down_w @ np.array(inner)


def _group_rule(config):
    """max (V2) or top2_sum (V3, with the correction bias) unless the config names one."""
    if config.group_score_rule is not None:
        return config.group_score_rule
    return "top2_sum" if config.topk_method == "noaux_tc" else "max"


def _route(config, gate_w, bias, x):
    """Expert ids and gate values of one token: groups, then experts, each ranked by (-score, index)."""
    logits = [float(row @ x) for row in gate_w]
    if config.scoring_func == "sigmoid":
        scores = [_logistic(z) for z in logits]
    else:
        top = max(logits)
        total = math.fsum(math.exp(z - top) for z in logits)
        scores = [math.exp(z - top) / total for z in logits]
    choose = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
    size = config.n_routed_experts // config.n_group
    group_value = []
    for g in range(config.n_group):
        members = sorted(choose[g * size:(g + 1) * size], reverse=True)
        group_value.append(members[0] if _group_rule(config) == "max" else sum(members[:2]))
    kept = {g for _, g in sorted((-v, g) for g, v in enumerate(group_value))[: config.topk_group]}
    fill = -math.inf if config.group_mask_fill == "-inf" else 0.0
    candidates = [choose[e] if e // size in kept else fill for e in range(config.n_routed_experts)]
    ids = [e for _, e in sorted((-v, e) for e, v in enumerate(candidates))[: config.num_experts_per_tok]]
    gates = [scores[e] for e in ids]
    renormalise = config.scoring_func == "sigmoid" if config.topk_norm_rule == "sigmoid_only" else config.norm_topk_prob
    if renormalise:
        total = math.fsum(gates) + config.topk_norm_epsilon
        gates = [g / total for g in gates]
    return ids, [g * config.routed_scaling_factor for g in gates]


def _ffn(config, weights, layer, x):
    p = f"model.layers.{layer}.mlp."
    moe = layer >= config.first_k_dense_replace and layer % config.moe_layer_freq == 0
    if not moe:
        return _swiglu(x, weights[p + "gate_proj.weight"], weights[p + "up_proj.weight"], weights[p + "down_proj.weight"])
    ids, gates = _route(config, weights[p + "gate.weight"], weights.get(p + "gate.e_score_correction_bias"), x)
    out = np.zeros(len(x))
    for expert, gate in zip(ids, gates):
        e = f"{p}experts.{expert}."
        out = out + gate * _swiglu(x, weights[e + "gate_proj.weight"], weights[e + "up_proj.weight"], weights[e + "down_proj.weight"])
    if config.n_shared_experts:
        s = p + "shared_experts."
        out = out + _swiglu(x, weights[s + "gate_proj.weight"], weights[s + "up_proj.weight"], weights[s + "down_proj.weight"])
    return out


def _block(config, weights, layer, rows, positions):
    """One pre-norm decoder block over a list of row vectors (causal by position)."""
    p = f"model.layers.{layer}."
    eps = config.rms_norm_eps
    attention_input = np.array([_norm(r, weights[p + "input_layernorm.weight"], eps) for r in rows])
    attention_weights = {name[len(p + "self_attn."):]: value for name, value in weights.items() if name.startswith(p + "self_attn.")}
    attended, _ = slow_mla(config, attention_weights, attention_input, positions)
    rows = [r + a for r, a in zip(rows, attended)]
    return [r + _ffn(config, weights, layer, _norm(r, weights[p + "post_attention_layernorm.weight"], eps)) for r in rows]


def slow_main(config, weights, tokens, start=0):
    """One sequence through the stack: (pre_norm rows, post_norm rows, logits rows)."""
    rows = [np.array(weights["model.embed_tokens.weight"][t], dtype=np.float64) for t in tokens]
    positions = [start + i for i in range(len(tokens))]
    for layer in range(config.num_hidden_layers):
        rows = _block(config, weights, layer, rows, positions)
    post = [_norm(r, weights["model.norm.weight"], config.rms_norm_eps) for r in rows]
    return rows, post, [weights["lm_head.weight"] @ h for h in post]


def _log_prob(logit_row, target):
    top = max(float(v) for v in logit_row)
    return float(logit_row[target]) - top - math.log(math.fsum(math.exp(float(v) - top) for v in logit_row))


def _module_layer(config, depth):
    """Depth k runs module k, or with reuse the modules 1 .. M in turn: 1, 2, .., M, 1, 2, .."""
    module = depth if config.mtp_module_reuse == "none" else 1 + (depth - 1) % config.num_nextn_predict_layers
    return config.num_hidden_layers + module - 1


def slow_module(config, weights, depth, stream, previous, rows):
    """Module of ``depth`` on rows 0 .. rows-1: row i joins Emb(stream[i + depth]) and previous[i]. Returns (h^k rows, logits rows)."""
    layer = _module_layer(config, depth)
    p = f"model.layers.{layer}."
    eps = config.rms_norm_eps
    combined = []
    for i in range(rows):
        e = _norm(weights["model.embed_tokens.weight"][stream[i + depth]], weights[p + "enorm.weight"], eps)
        h = _norm(previous[i], weights[p + "hnorm.weight"], eps)
        joined = list(e) + list(h) if config.mtp_concat_order == "embedding_first" else list(h) + list(e)
        combined.append(weights[p + "eh_proj.weight"] @ np.array(joined))
    offset = depth if config.mtp_rope_position == "token" else 0
    block = _block(config, weights, layer, combined, [i + offset for i in range(rows)])
    hidden = [_norm(b, weights[p + "shared_head.norm.weight"], eps) for b in block]
    return hidden, [weights["lm_head.weight"] @ h for h in hidden]


def slow_losses(config, weights, batch_tokens, depths, mtp_lambda=0.3):
    """Main loss, per-depth losses (each / T), L_MTP and per-depth logits, one sequence at a time."""
    main_terms, depth_terms, depth_logits = [], [[] for _ in range(depths)], [[] for _ in range(depths)]
    seq = len(batch_tokens[0]) - 1
    for tokens in batch_tokens:
        tokens = [int(t) for t in tokens]
        pre, post, logits = slow_main(config, weights, tokens[:seq])
        main_terms.append(-math.fsum(_log_prob(logits[i], tokens[i + 1]) for i in range(seq)) / seq)
        previous = post if config.mtp_hidden_source == "post_norm" else pre
        for depth in range(1, depths + 1):
            previous, logits = slow_module(config, weights, depth, tokens, previous, seq - depth)
            depth_terms[depth - 1].append(-math.fsum(_log_prob(logits[i], tokens[i + depth + 1]) for i in range(seq - depth)) / seq)
            depth_logits[depth - 1].append(np.array(logits))
    per_depth = [math.fsum(terms) / len(terms) for terms in depth_terms]
    mtp = mtp_lambda / depths * math.fsum(per_depth)
    main = math.fsum(main_terms) / len(main_terms)
    return {"main": main, "depths": per_depth, "mtp": mtp, "total": main + mtp, "logits": [np.stack(x) for x in depth_logits]}


def slow_drafts(config, weights, known, depths):
    """MTP drafts after the known tokens t_0 .. t_n, without any cache: every depth reruns rows 0 .. n-1.

    Recurrent reuse: module 1 reruns its whole row sequence each step, one row longer: row n - 1 + j
    joins the h its predecessor produced with Emb(d_j).
    """
    stream = [int(t) for t in known]
    n = len(stream) - 1
    pre, post, _ = slow_main(config, weights, stream[:n])
    previous = post if config.mtp_hidden_source == "post_norm" else pre
    drafts = []
    if config.mtp_module_reuse == "recurrent":
        previous = list(previous)
        for step in range(depths):
            hidden, logits = slow_module(config, weights, 1, stream, previous, n + step)
            last = [float(v) for v in logits[n + step - 1]]
            drafts.append(last.index(max(last)))
            stream.append(drafts[-1])
            previous.append(hidden[n + step - 1])
        return drafts
    for depth in range(1, depths + 1):
        previous, logits = slow_module(config, weights, depth, stream, previous, n)
        last = [float(v) for v in logits[n - 1]]
        drafts.append(last.index(max(last)))
        stream.append(drafts[-1])
    return drafts
