"""The derived constants of a config, as ``mla-ref info`` prints them (spec/config.yaml ``derived``)."""

from __future__ import annotations


from .config import ModelConfig, cache_values_per_token
from .moe import renormalises_topk
from .rope import (base_inverse_frequencies, rope_amplitude, rope_frequencies, softmax_scale, yarn_correction_range,
                   yarn_get_mscale, yarn_ramp)
from .weights import parameter_count

BYTES_PER_VALUE = {"bf16": 2, "fp32": 4}


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    if not layers:
        return "none"
    parts, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + [None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(parts)


def _routing_lines(config: ModelConfig) -> list[str]:
    """The MoE routing constants and which rules of spec/moe.yaml apply."""
    per_group = config.n_routed_experts // config.n_group
    if config.n_group == 1:
        groups = "1 (no group limit)"
        group_rule = f"{config.group_rule}, no effect with one group"
    else:
        groups = f"{config.n_group} of {per_group} experts, keep {config.topk_group}"
        group_rule = config.group_rule
    if config.topk_norm_rule == "sigmoid_only":
        norm_reason = f"topk_norm_rule sigmoid_only, scoring_func {config.scoring_func}"
    else:
        norm_reason = f"topk_norm_rule norm_topk_prob, norm_topk_prob {str(config.norm_topk_prob).lower()}"
    return [
        "MoE routing (spec/moe.yaml)",
        f"  routed experts             {config.n_routed_experts}, top-{config.num_experts_per_tok} per token, width {config.moe_intermediate_size}",
        f"  expert groups              {groups}",
        f"  shared experts             {config.n_shared_experts}" + (f" (one MLP of width {config.shared_expert_width})" if config.n_shared_experts else ""),
        f"  score function             {config.scoring_func} (MOE.2)",
        "  correction bias            " + (f"yes, selection only (topk_method {config.topk_method}, MOE.3)" if config.has_correction_bias
                                            else f"no (topk_method {config.topk_method})"),
        f"  group score rule           {group_rule} (MOE.4)",
        f"  dropped-group fill         {config.group_mask_fill} (MOE.6)" + (" (unused: no group is dropped)" if config.topk_group == config.n_group else ""),
        f"  renormalise top-k weights  {'yes' if renormalises_topk(config) else 'no'} ({norm_reason}), epsilon {config.topk_norm_epsilon!r} (MOE.8)",
        f"  routed scaling factor      {config.routed_scaling_factor!r}, always applied (MOE.8)",
        "  bias update speed          " + (f"{config.bias_update_speed!r} (MOE.15)" if config.has_correction_bias else "unused (no correction bias)"),
        f"  balance loss alpha         {config.aux_loss_alpha!r} (config.json; MOE.16 sequence-wise or MOE.17 expert-level; the V3 report trained MOE.16 with 1e-4)",
    ]


def _sparse_attention_lines(config: ModelConfig) -> list[str]:
    """The DSA indexer's fields and constants (spec/dsa.yaml), for a config that sets index_topk."""
    return [
        "",
        "sparse attention, DSA (spec/dsa.yaml)",
        f"  index heads x head dim     {config.index_n_heads} x {config.index_head_dim}  (index_n_heads, index_head_dim)",
        f"  index_topk                 {config.index_topk}  (each query attends to min(index_topk, visible keys), DSA.10)",
        f"  score scale                {config.index_head_dim ** -0.5!r}  (index_head_dim ** -0.5, DSA.8)",
        f"  head weight factor         {config.index_n_heads ** -0.5!r}  (index_n_heads ** -0.5, DSA.3)",
        f"  indexer rope               half layout on the first {config.qk_rope_head_dim} dims, [rope | nope], MLA's YaRN table (DSA.4)",
        f"  key norm                   LayerNorm with bias, eps {config.index_norm_eps!r} (DSA.2)",
        f"  indexer key cache          {config.index_head_dim} values per token (DSA.7)",
    ]


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters from the checkpoint shapes: main model, MTP modules, and those active for one token.

    Active = everything of the main model except the routed experts, plus num_experts_per_tok
    routed experts in every MoE layer (embedding and LM head included). Counted per layer
    (weights.parameter_count), never by listing every expert's tensors.
    """
    main, routed = parameter_count(config)
    for layer in range(config.num_hidden_layers):
        total, experts = parameter_count(config, layer)
        main, routed = main + total, routed + experts
    mtp = sum(parameter_count(config, layer)[0] for layer in range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers))
    per_expert = 3 * config.moe_intermediate_size * config.hidden_size
    return {"main": main, "mtp": mtp, "active": main - routed + config.num_experts_per_tok * per_expert * len(config.moe_layers)}


def info_text(config: ModelConfig) -> str:
    """A human-readable report of the derived constants of ``config``."""
    m = yarn_get_mscale(config.rope_factor, config.mscale_all_dim)
    base_scale = config.qk_head_dim ** -0.5
    lines = [
        f"config: {config.name}",
        f"source: {config.source}",
        "",
        "attention (spec/mla.yaml, spec/rope.yaml)",
        f"  heads                      {config.num_attention_heads}",
        f"  q_lora_rank                {config.q_lora_rank if config.q_lora_rank else 'none (direct q_proj)'}",
        f"  kv_lora_rank               {config.kv_lora_rank}",
        f"  qk_nope / rope / v dims    {config.qk_nope_head_dim} / {config.qk_rope_head_dim} / {config.v_head_dim}",
        f"  qk_head_dim                {config.qk_head_dim}",
        f"  softmax scale without YaRN {base_scale!r}  (qk_head_dim ** -0.5)",
        f"  YaRN m (mscale_all_dim)    {m!r}  (0.1 * {config.mscale_all_dim} * ln({config.rope_factor}) + 1)",
        f"  softmax scale with YaRN    {base_scale * m * m!r}  (x m^2 = {m * m!r})",
        f"  applies                    {'with YaRN' if config.yarn_active else 'without YaRN'} "
        f"(rope_scaling_type={config.rope_scaling_type}, yarn_activation={config.yarn_activation}"
        + (f", max_seq_len={config.max_seq_len} vs original {config.original_max_position_embeddings}" if config.yarn_activation == "max_seq_len" else "") + ")",
        f"  softmax scale in use       {softmax_scale(config)!r}",
        f"  cos/sin amplitude          {rope_amplitude(config)!r}  (mscale / mscale_all_dim)",
        f"  rope layout                {config.rope_layout}",
    ]
    if config.sparse_attention:
        lines += _sparse_attention_lines(config)
    lines += [
        "",
        "RoPE / YaRN (ROPE.1-ROPE.3)",
        f"  rope_theta {config.rope_theta}, factor {config.rope_factor}, original length {config.original_max_position_embeddings}, "
        f"beta_fast {config.beta_fast}, beta_slow {config.beta_slow}",
    ]
    low, high = yarn_correction_range(config)
    lines.append(f"  correction range           low = {low}, high = {high}" + ("" if config.yarn_active else "  (YaRN inactive: frequencies unchanged)"))
    lines.append("     j   base inv_freq        ramp     frequency in use")
    ramp = yarn_ramp(config) if config.yarn_active else [0.0] * (config.qk_rope_head_dim // 2)
    for j, (base, weight, used) in enumerate(zip(base_inverse_frequencies(config), ramp, rope_frequencies(config))):
        lines.append(f"  {j:4d}   {base:.10e}  {weight:8.5f}   {used:.10e}")
    lines += ["", "layers (CONFIG first_k_dense_replace, moe_layer_freq)",
              f"  dense layers               {_ranges(config.dense_layers)}",
              f"  MoE layers                 {_ranges(config.moe_layers)}",
              f"  MTP modules                {config.num_nextn_predict_layers}"
              + (f" (layer ids {config.num_hidden_layers}..{config.num_hidden_layers + config.num_nextn_predict_layers - 1})" if config.num_nextn_predict_layers else ""),
              ""]
    lines += _routing_lines(config)
    lines += ["", "cache per token per layer (values; bytes in bf16 / fp32)"]
    values = cache_values_per_token(config)
    per_kv_head = config.qk_head_dim + config.v_head_dim
    rows = [("latent (absorbed MLA)", values["latent"], "kv_lora_rank + qk_rope_head_dim"),
            ("naive MLA (per-head k, v)", values["naive"], "heads x (qk_head_dim + v_head_dim)"),
            ("MHA, same head dims", values["mha"], f"{config.num_attention_heads} kv heads x {per_kv_head}"),
            (f"GQA, {min(8, config.num_attention_heads)} kv heads", values["gqa8"], f"{min(8, config.num_attention_heads)} x {per_kv_head}")]
    for label, count, formula in rows:
        lines.append(f"  {label:27s}{count:9d}  {count * BYTES_PER_VALUE['bf16']:10d} B / {count * BYTES_PER_VALUE['fp32']:10d} B   ({formula})")
    lines.append(f"  naive / latent             {values['naive'] / values['latent']:.2f}x")
    lines.append(f"  latent equals GQA with     {values['gqa_equal_kv_heads']:.3f} kv heads of these dims "
                 f"({values['latent'] / (2 * config.v_head_dim):.3f} groups of 2 x d_h = {2 * config.v_head_dim}, V2R's comparison)")
    lines.append(f"  whole model, latent, bf16  {values['latent'] * 2 * config.num_hidden_layers} B per token ({config.num_hidden_layers} layers)")
    counts = parameter_counts(config)
    lines += ["", "parameters (from the checkpoint shapes)",
              f"  main model                 {counts['main'] / 1e9:.2f} B",
              f"  active per token           {counts['active'] / 1e9:.2f} B (all but the routed experts, plus {config.num_experts_per_tok} routed experts per MoE layer)",
              f"  MTP modules                {counts['mtp'] / 1e9:.2f} B (embedding and head shared with the main model)"]
    return "\n".join(lines)
