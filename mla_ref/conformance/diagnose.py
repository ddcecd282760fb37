"""Name the systematic error behind a failure: constant ratios, LSE base, RoPE layout, and known-bug variants.

Two tools. A *signature* test looks at one failing tensor: is the candidate a constant
multiple of the truth (a softmax-scale or LSE-base bug), or the truth with its rope dims
permuted (interleaved vs half layout)? A *variant* test re-runs the reference with one
well-known bug switched on (missing m^2, swapped layout, positions off by one, a visible
canary, V2 vs V3 routing rules...) and asks whether the candidate matches that instead.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..cache import gather_paged_rows
from ..config import from_dict
from ..mla import causal_visibility, latent_attention
from ..moe import routing_weights
from ..rope import half_layout_permutation, softmax_scale, yarn_get_mscale
from .compare import Comparison, compare_tensor
from .protocol import call


def _ratio_names(config) -> dict[str, float]:
    """Factors that a known bug multiplies a logit or an LSE by."""
    names = {"log2(e): LSE in base 2 instead of the natural log": 1 / math.log(2)}
    m2 = yarn_get_mscale(config.rope_factor, config.mscale_all_dim) ** 2 if config.rope_scaling_type == "yarn" else 1.0
    if abs(m2 - 1) > 1e-6:
        names[f"1/m^2 = 1/{m2:.4f}: missing the YaRN mscale^2 on the softmax scale"] = 1 / m2
        names[f"m^2 = {m2:.4f}: mscale^2 applied twice"] = m2
    width = config.kv_lora_rank + config.qk_rope_head_dim
    used = softmax_scale(config)
    names[f"scale {width}^-0.5 (the absorbed width) instead of {used:.6g}"] = width ** -0.5 / used
    names[f"scale {config.qk_head_dim}^-0.5 without m^2 (the FlashInfer default)"] = config.qk_head_dim ** -0.5 / used
    return names


def signature(name: str, candidate, truth: np.ndarray, config) -> list[str]:
    """Constant-ratio and permutation signatures of one failing tensor."""
    messages = []
    candidate = np.asarray(candidate, dtype=np.float64)
    if candidate.shape != truth.shape or truth.dtype.kind != "f":
        return messages
    finite = np.isfinite(truth) & np.isfinite(candidate)
    c, t = candidate[finite], truth[finite]
    if t.size >= 4 and np.dot(t, t) > 0:  # a scalar is always a multiple of the truth: no signature
        ratio = float(np.dot(c, t) / np.dot(t, t))
        residual = float(np.linalg.norm(c - ratio * t) / max(np.linalg.norm(c), 1e-300))
        if residual < 2e-2 and abs(ratio - 1) > 1e-3:
            known = [label for label, factor in _ratio_names(config).items()
                     if abs(factor - 1) > 2e-2 and abs(ratio / factor - 1) < 2e-2]  # a factor of ~1 names nothing here
            messages.append(f"{name} is {ratio:.4f} x the truth" + (f" ({known[0]})" if known else " (a constant factor: a scale bug)"))
    rope = config.qk_rope_head_dim
    if truth.ndim and truth.shape[-1] == rope and rope >= 4:
        permutation = half_layout_permutation(rope)
        for label, permuted in (("half-layout order", truth[..., permutation]), ("interleaved order", truth[..., np.argsort(permutation)])):
            if np.allclose(candidate, permuted, rtol=1e-2, atol=1e-2 * float(np.abs(truth[np.isfinite(truth)]).max(initial=0))):
                messages.append(f"{name} equals the truth with its rope dims in {label}: RoPE layout (interleaved vs half) mix-up")
                break
    return messages


def bias_in_weights(name: str, candidate, case: dict, config) -> list[str]:
    """MOE.8 signature: the candidate's routing weights are those of the biased selection scores (bias not selection-only)."""
    scores, bias = case["step"].get("MOE.2/scores"), case["weight"].get("mlp.gate.e_score_correction_bias")
    ids = case["output"].get("expert_ids", case["step"].get("MOE.7/expert_ids"))
    candidate = np.asarray(candidate, dtype=np.float64)
    if scores is None or bias is None or ids is None or candidate.shape != ids.shape:
        return []
    biased = routing_weights(config, scores + bias, ids)  # the weights with e_score_correction_bias left in
    if np.allclose(candidate, biased, rtol=1e-2, atol=1e-3 * float(np.abs(biased).max(initial=1.0))):
        return [f"{name} equals the weights of the biased scores: e_score_correction_bias added to the routing weights "
                "(it only selects experts, MOE.3 / MOE.8)"]
    return []


def _core_mask_variants(case: dict, args: dict) -> list[tuple[str, dict[str, np.ndarray]]]:
    """MLA.17 with the causal mask shifted: (description, {out, lse}) for the shifts kernels get wrong.

    A shifted mask either stays inside the cache or reads the slot just past it (where the
    golden cases keep a canary key).
    """
    inputs = case["input"]
    q, seqlens = np.asarray(inputs["q"], dtype=np.float64), np.asarray(inputs["cache_seqlens"])
    batch, s_q = q.shape[:2]
    key_rows = gather_paged_rows(np.asarray(inputs["k_cache"], dtype=np.float64), np.asarray(inputs["block_table"]), seqlens + 1)
    keys = np.arange(key_rows.shape[1])[None, None, :]
    shifts = (("causal mask off by one (+1): each query also sees the next key", seqlens - s_q + 1),
              ("causal mask off by one (-1): each query misses its own key (j < i, not j <= i)", seqlens - s_q - 1),
              ("causal mask aligned top-left (query i sees keys 0 .. i): the wrong origin after a cached prefix", np.zeros(batch, np.int64)))
    variants = []
    for description, offsets in shifts:
        causal = causal_visibility(offsets, np.full(batch, s_q), s_q, key_rows.shape[1])
        for where, limit in ((" within the cache", seqlens), (", reading the slot past the cache", seqlens + 1)):
            visible = causal & (keys < limit[:, None, None])
            out, lse = latent_attention(q, key_rows, visible, float(args["softmax_scale"]), int(args["head_dim_v"]))
            if not (variants and variants[-1][0].startswith(description) and np.array_equal(variants[-1][1]["out"], out)):
                variants.append((description + where, {"out": out, "lse": lse}))  # the slot past the cache changes something
    return variants


def _variants(entry: dict, config) -> list[tuple[str, dict, dict]]:
    """(description, config changes, argument changes) of well-known bugs for this entry point."""
    point = entry["entry_point"]
    variants = []
    if point in ("mla_prefill", "mla_extend"):
        if config.rope_scaling_type == "yarn":
            variants.append(("missing YaRN mscale^2 on the softmax scale", {"mscale_all_dim": 0.0}, {}))
            variants.append(("YaRN frequencies not applied (plain RoPE)", {"rope_scaling_type": None}, {}))
        variants.append(("RoPE pairs in the other layout (interleaved vs half)",
                         {"rope_layout": "half" if config.rope_layout == "interleaved" else "interleaved"}, {}))
        variants.append(("RMSNorm eps 1e-5 instead of the config's", {"rms_norm_eps": 1e-5}, {}))
        key = "start_positions" if point == "mla_prefill" else None
        if key:
            variants.append(("positions off by one (+1)", {}, {key: +1}))
            variants.append(("positions off by one (-1)", {}, {key: -1}))
    if point == "latent_attention_core":
        variants.append(("one key too many: the canary past cache_seqlens is attended", {}, {"cache_seqlens": +1}))
        variants.append(("the causal mask is not applied", {}, {"causal": "flip"}))
        variants.append(("softmax scale 576^-0.5 style: 1/sqrt(q width) instead of the passed scale", {}, {"softmax_scale": "width"}))
    if point in ("moe_route", "moe_layer"):
        variants.append(("the other score function (sigmoid vs softmax)", {"scoring_func": "softmax" if config.scoring_func == "sigmoid" else "sigmoid"}, {}))
        variants.append(("the other group score rule (max vs top-2 sum)", {"group_score_rule": "max" if config.group_rule == "top2_sum" else "top2_sum"}, {}))
        variants.append(("dropped groups filled with 0.0 instead of -inf", {"group_mask_fill": "zero" if config.group_mask_fill == "-inf" else "-inf"}, {}))
        variants.append(("topk_group ignored (no group limit)", {"topk_group": config.n_group}, {}))
        variants.append(("weights not renormalised / renormalised wrongly", {"norm_topk_prob": not config.norm_topk_prob}, {}))
        variants.append(("routed_scaling_factor missing", {"routed_scaling_factor": 1.0} if config.routed_scaling_factor != 1 else {"routed_scaling_factor": 2.0}, {}))
    return variants


def _shifted(args: dict, inputs: dict, changes: dict, width: int) -> tuple[dict, dict]:
    args, inputs = dict(args), dict(inputs)
    for key, change in changes.items():
        if key in inputs:
            inputs[key] = np.maximum(np.asarray(inputs[key]) + change, 0)
        elif change == "flip":
            args[key] = not args[key]
        elif change == "width":
            args[key] = width ** -0.5
    return args, inputs


def diagnose(entry: dict, case: dict, produced: Mapping, profile: str, failures: list[Comparison]) -> list[str]:
    """Human-readable guesses for the failures of one case (may be empty)."""
    from . import reference_adapter
    config = from_dict(entry["config"])
    messages = []
    for failure in failures:
        name = failure.name
        truth = case["output"].get(name) if "/" not in name else case["step"].get(name)
        if truth is not None and name in produced:
            messages += signature(name, produced[name], truth, config)
        if name in ("weights", "MOE.8/weights") and entry["entry_point"] in ("moe_route", "moe_layer") and name in produced:
            messages += bias_in_weights(name, produced[name], case, config)
    failed_outputs = [f.name for f in failures if "/" not in f.name and f.name in produced and f.name in case["output"]]
    noises = entry["profiles"].get(profile, {}).get("noise", {})
    if entry["entry_point"] == "latent_attention_core" and entry["args"].get("causal") and failed_outputs:
        for description, expected in _core_mask_variants(case, entry["args"]):
            if _explains(failed_outputs, produced, expected, case, noises, profile):
                messages.append(f"matches the reference with this bug: {description}")
    width = int(np.shape(case["input"]["q"])[-1]) if "q" in case["input"] else 0
    for description, config_changes, arg_changes in _variants(entry, config) if failed_outputs else []:
        try:
            variant = from_dict({**entry["config"], **config_changes})
            args, inputs = _shifted(entry["args"], case["input"], arg_changes, width)
            available = {**inputs, **args, "config": variant.to_dict(), "weights": dict(case["weight"])}
            expected = call(getattr(reference_adapter, entry["entry_point"]), entry["entry_point"], available)
        except Exception:  # noqa: BLE001 - a variant that cannot run says nothing
            continue
        if _explains(failed_outputs, produced, expected, case, noises, profile):
            messages.append(f"matches the reference with this bug: {description}")
    return messages


def _explains(failed_outputs: list[str], produced: Mapping, expected: Mapping, case: dict, noises: dict, profile: str) -> bool:
    """Whether every failed output matches the bug variant's, and the variant's differs from the truth."""
    return all(
        compare_tensor(name, produced[name], expected[name], noises.get(f"output:{name}", 0.0), profile).passed
        and not compare_tensor(name, expected[name], case["output"][name], noises.get(f"output:{name}", 0.0), profile).passed
        for name in failed_outputs)
