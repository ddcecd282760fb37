"""Hugging Face transformers' DeepSeek-V2 / V3 / V3.2 modules behind the adapter protocol of spec/golden.yaml.

Code nobody on this project wrote, run as its users run it: the case's config becomes a
``DeepseekV32Config`` (DeepSeek Sparse Attention: the config sets index_topk), a
``DeepseekV3Config`` (sigmoid routing with the correction bias) or ``DeepseekV2Config`` (softmax
routing), HF's own modules are instantiated from it (attention, router, MoE block, the whole
``*ForCausalLM``) and the case's weights are loaded into them by name. Everything numeric is
HF's as shipped with transformers 5.25.0: its float32 RoPE table (inverse frequencies and
angles), its YaRN ``attention_factor`` and mscale on the softmax scale, its RoPE layout
(V3, V3.2: interleaved pairs rotated into de-interleaved halves; V2: complex products; the V3.2
indexer: rotate-half), its routing (``torch.topk``, its tie order), its V3.2 indexer (no
Hadamard, no FP8, ``torch.topk`` over the masked scores) and index mask, its attention
implementations and masks, ``generate`` for greedy decoding. The adapter's own glue is only what
a checkpoint loader or serving engine would do: fusing the per-expert checkpoint tensors into
HF's ``gate_up_proj`` / ``down_proj``, keeping the tensors HF declares float32
(``_keep_in_fp32_modules_strict``) in float32 when the rest is cast, filling HF's latent cache
from the case's cache rows (the k_pe half permuted into the layout HF's rotation produces) and
HF's indexer key cache from the case's indexer keys (the Hadamard taken off: HF caches keys
without it), renumbering HF's selected key slots as positions, and zeroing padded rows.

A case HF cannot express raises ``mla_ref.Unsupported`` with the reason: the FlashMLA kernel
contract, MTP, the training rules, configs outside HF's fields (see ``_routing`` and the V3.2
checks in ``_hf_config``). HF's indexer returns no index scores and its attention no lse: those
optional outputs are left out.

Settings, at import from the environment or later by ``configure(dtype, attention)``:
``MLA_REF_HF_DTYPE`` = float32 | bfloat16 (default float32; ``PROFILE`` follows: fp32 | bf16),
``MLA_REF_HF_ATTENTION`` = eager | sdpa (default eager) and ``MLA_REF_HF_EXPERTS`` = eager |
grouped_mm | batched_mm (HF's experts implementations; default eager, the loop over experts of the
modeling file: grouped_mm, HF's model default, needs 16-byte row strides, which the tiny configs'
20-wide experts break in bfloat16, and is then declared unsupported).

    pip install torch==2.13.0 transformers==5.25.0
    MLA_REF_HF_DTYPE=bfloat16 MLA_REF_HF_ATTENTION=sdpa mla-ref check examples/hf_adapter.py
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np
import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config,
                          DeepseekV32ForCausalLM, DynamicCache, GenerationConfig)
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32

from mla_ref import Unsupported

TRANSFORMERS_VERSION = "5.25.0"
PROFILES = {"float32": "fp32", "bfloat16": "bf16"}
ATTENTIONS = ("eager", "sdpa")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
DTYPE, ATTENTION, EXPERTS, PROFILE = "float32", "eager", "eager", "fp32"



class Family(NamedTuple):
    """HF's classes of one model family."""

    config: type
    model: type
    attention: type
    rotary: type
    router: type
    moe: type
    mlp: type


FAMILIES = {
    "v2": Family(DeepseekV2Config, DeepseekV2ForCausalLM, hf_v2.DeepseekV2Attention, hf_v2.DeepseekV2RotaryEmbedding,
                 hf_v2.DeepseekV2TopkRouter, hf_v2.DeepseekV2Moe, hf_v2.DeepseekV2MLP),
    "v3": Family(DeepseekV3Config, DeepseekV3ForCausalLM, hf_v3.DeepseekV3Attention, hf_v3.DeepseekV3RotaryEmbedding,
                 hf_v3.DeepseekV3TopkRouter, hf_v3.DeepseekV3MoE, hf_v3.DeepseekV3MLP),
    "v32": Family(DeepseekV32Config, DeepseekV32ForCausalLM, hf_v32.DeepseekV32Attention, hf_v32.DeepseekV32RotaryEmbedding,
                  hf_v32.DeepseekV32TopkRouter, hf_v32.DeepseekV32MoE, hf_v32.DeepseekV32MLP),
}


def configure(dtype: str = "float32", attention: str = "eager", experts: str = "eager") -> None:
    """Choose the dtype of weights and activations and HF's attention and experts implementations of every later call."""
    global DTYPE, ATTENTION, EXPERTS, PROFILE
    if dtype not in PROFILES:
        raise ValueError(f"MLA_REF_HF_DTYPE: expected one of {sorted(PROFILES)}, got {dtype!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"MLA_REF_HF_ATTENTION: expected one of {list(ATTENTIONS)}, got {attention!r}")
    if experts not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"MLA_REF_HF_EXPERTS: expected one of {list(EXPERTS_IMPLEMENTATIONS)}, got {experts!r}")
    DTYPE, ATTENTION, EXPERTS, PROFILE = dtype, attention, experts, PROFILES[dtype]


configure(os.environ.get("MLA_REF_HF_DTYPE", "float32"), os.environ.get("MLA_REF_HF_ATTENTION", "eager"),
          os.environ.get("MLA_REF_HF_EXPERTS", "eager"))


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unsupported(f"transformers {TRANSFORMERS_VERSION}: {reason}")


def _dtype() -> torch.dtype:
    return getattr(torch, DTYPE)


def _tensor(array) -> torch.Tensor:
    """A float input in the model dtype (one rounding from float64)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float64)).to(_dtype())


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return tensor.to(torch.float64 if tensor.is_floating_point() else torch.int64).numpy()


# ---------------------------------------------------------------------------- the HF config of a case

def _routing_family(cfg: dict) -> str:
    """v3 for sigmoid scores (HF's router adds the correction bias), v2 for softmax scores."""
    return "v3" if cfg["scoring_func"] == "sigmoid" else "v2"


def _attention_family(cfg: dict) -> str:
    """HF's attention of the case: DeepSeek-V3.2's (MLA with the DSA indexer) for a config with index_topk, else
    DeepSeek-V2's (complex RoPE products) where DeepseekV2Config can hold the config.

    DeepseekV3Attention is the same MLA with a choice of RoPE layout; it serves the half layout, sigmoid
    configs, and V2 configs whose hidden_size is not a multiple of the heads (DeepseekV2Config refuses them,
    although MLA never divides hidden_size by the heads).
    """
    if cfg.get("index_topk") is not None:
        return "v32"
    v2 = cfg["scoring_func"] == "softmax" and cfg["rope_layout"] == "interleaved" and cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    return "v2" if v2 else "v3"


def _model_family(cfg: dict) -> str:
    """HF's causal LM of the case: DeepseekV32ForCausalLM for DSA (its router is V3's), else the family of the routing."""
    return "v32" if cfg.get("index_topk") is not None else _routing_family(cfg)


def _rope_parameters(cfg: dict) -> dict:
    """HF rope_parameters: default RoPE, or YaRN with both mscales (HF derives the cos/sin amplitude and the m^2 of the scale)."""
    if cfg["rope_scaling_type"] is None:
        return {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    _require(cfg["yarn_activation"] == "always" or cfg["max_seq_len"] > cfg["original_max_position_embeddings"],
             f"HF applies YaRN whenever rope_type is yarn; the config switches it off (yarn_activation max_seq_len, "
             f"max_seq_len {cfg['max_seq_len']} <= original_max_position_embeddings {cfg['original_max_position_embeddings']})")
    return {"rope_type": "yarn", "rope_theta": cfg["rope_theta"], "factor": cfg["rope_factor"],
            "original_max_position_embeddings": cfg["original_max_position_embeddings"], "beta_fast": cfg["beta_fast"],
            "beta_slow": cfg["beta_slow"], "mscale": cfg["mscale"], "mscale_all_dim": cfg["mscale_all_dim"],
            "truncate": cfg["yarn_truncate"]}


def _routing(cfg: dict, family: str) -> dict:
    """The router fields of the HF config; Unsupported where HF's router cannot compute the config's rule."""
    per_group = cfg["n_routed_experts"] // cfg["n_group"]
    normalise = cfg["norm_topk_prob"] if cfg["topk_norm_rule"] == "norm_topk_prob" else cfg["scoring_func"] == "sigmoid"
    group_rule = cfg["group_score_rule"] or ("top2_sum" if cfg["topk_method"] == "noaux_tc" else "max")
    if family == "v3":
        _require(cfg["topk_method"] == "noaux_tc", f"DeepseekV3TopkRouter always adds e_score_correction_bias to sigmoid "
                                                   f"scores (noaux_tc); the config says topk_method {cfg['topk_method']}")
        _require(group_rule == "top2_sum", f"DeepseekV3TopkRouter scores a group by its top-2 sum; the config says {group_rule}")
        _require(cfg["group_mask_fill"] == "-inf", "DeepseekV3TopkRouter gives experts of dropped groups -inf; the config says 0.0")
        _require(per_group >= 2, f"DeepseekV3TopkRouter takes topk(2) inside each group and raises on a group of {per_group} "
                                 f"expert (n_routed_experts {cfg['n_routed_experts']} / n_group {cfg['n_group']})")
        return {"n_group": cfg["n_group"], "topk_group": cfg["topk_group"], "norm_topk_prob": normalise}
    _require(cfg["topk_method"] in ("greedy", "group_limited_greedy"),
             f"DeepseekV2TopkRouter (softmax) knows greedy and group_limited_greedy, not {cfg['topk_method']}")
    _require(not normalise, "DeepseekV2TopkRouter never renormalises the chosen weights (it does not read norm_topk_prob); the config does")
    if cfg["topk_method"] == "group_limited_greedy":
        _require(group_rule == "max", f"DeepseekV2TopkRouter scores a group by its max; the config says {group_rule}")
        _require(cfg["group_mask_fill"] == "zero" or cfg["topk_group"] * per_group >= cfg["num_experts_per_tok"],
                 "DeepseekV2TopkRouter gives experts of dropped groups 0.0, which differs from -inf when the kept groups "
                 "hold fewer experts than num_experts_per_tok")
    return {"n_group": cfg["n_group"], "topk_group": cfg["topk_group"], "topk_method": cfg["topk_method"], "norm_topk_prob": False}


def _first_moe_layer(cfg: dict) -> int:
    """HF makes layer l MoE iff l >= first_k_dense_replace: the config's MoE layers must be such a tail."""
    layers = cfg["num_hidden_layers"]
    moe = [layer for layer in range(layers) if layer >= cfg["first_k_dense_replace"] and layer % cfg["moe_layer_freq"] == 0]
    first = moe[0] if moe else layers
    _require(moe == list(range(first, layers)), f"HF makes every layer from first_k_dense_replace on MoE; moe_layer_freq "
                                                f"{cfg['moe_layer_freq']} makes only layers {moe} of {layers} MoE")
    return first


def _hf_config(cfg: dict, family: str, *, moe_only: bool = False):
    """The HF config of the case (attention and experts implementations as configured, MTP modules left out: no entry point here runs them)."""
    heads = cfg["num_attention_heads"]
    itemsize = torch.tensor([], dtype=_dtype()).element_size()
    _require(EXPERTS != "grouped_mm" or all(width * itemsize % 16 == 0 for width in (cfg["hidden_size"], cfg["moe_intermediate_size"])),
             f"experts_implementation grouped_mm needs rows of a multiple of 16 bytes; hidden_size {cfg['hidden_size']} and "
             f"moe_intermediate_size {cfg['moe_intermediate_size']} in {DTYPE} are not (torch raises 'strides should be multiple of 16 bytes')")
    if moe_only and cfg["hidden_size"] % heads:
        heads = 1  # the router and experts read no attention field; DeepseekV2Config insists on hidden_size % heads == 0
    if family == "v32":
        _require(_routing_family(cfg) == "v3", "DeepseekV32TopkRouter scores experts by sigmoid with the correction bias (as V3's); "
                                               f"the config says scoring_func {cfg['scoring_func']}")
    fields = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                  num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=cfg["q_lora_rank"],
                  kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
                  qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
                  intermediate_size=cfg["intermediate_size"], moe_intermediate_size=cfg["moe_intermediate_size"],
                  n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg["n_shared_experts"],
                  num_experts_per_tok=cfg["num_experts_per_tok"], routed_scaling_factor=cfg["routed_scaling_factor"],
                  first_k_dense_replace=_first_moe_layer(cfg), rms_norm_eps=cfg["rms_norm_eps"],
                  max_position_embeddings=cfg["max_position_embeddings"], rope_parameters=_rope_parameters(cfg),
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  attn_implementation=ATTENTION, experts_implementation=EXPERTS, **_routing(cfg, _routing_family(cfg)))
    if family == "v3":
        fields.update(rope_interleave=cfg["rope_layout"] == "interleaved", num_mtp_layers=0)
    elif family == "v32":
        _require(cfg["rope_layout"] == "interleaved", "DeepseekV32Attention rotates MLA's rope dims in interleaved pairs only "
                                                      "(it has no rope_interleave field)")
        _require(cfg["index_norm_eps"] == 1e-6, f"DeepseekV32Indexer builds its k_norm as LayerNorm(eps=1e-6) whatever the config; "
                                                f"the config says index_norm_eps {cfg['index_norm_eps']}")
        fields.update(index_n_heads=cfg["index_n_heads"], index_head_dim=cfg["index_head_dim"], index_topk=cfg["index_topk"])
    else:
        _require(cfg["rope_layout"] == "interleaved", "DeepseekV2Attention rotates interleaved pairs only")
    return FAMILIES[family].config(**fields)


# ---------------------------------------------------------------------------- modules with the case's weights

def _keep_float32(model_class, name: str) -> bool:
    """A tensor HF keeps in float32 whatever the model dtype (the class's _keep_in_fp32_modules_strict)."""
    return any(re.search(rf"(^|\.){re.escape(kept)}$", name) for kept in model_class._keep_in_fp32_modules_strict)


def _to_model_dtype(module: torch.nn.Module, model_class) -> torch.nn.Module:
    """Cast a standalone HF module as HF's from-config path casts it inside its model (checked against
    ``_from_config``: float32 router weight and bias, float32 RoPE inverse frequencies)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not _keep_float32(model_class, name) and not name.endswith("inv_freq"):
            tensor.data = tensor.data.to(_dtype())
    return module.eval()


def _fused_experts(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint names -> HF's module names: per-expert gate / up / down projections become the stacked
    ``experts.gate_up_proj`` [experts, 2 * moe_inter, hidden] (gate rows first: HF's forward chunks gate, up)
    and ``experts.down_proj`` [experts, hidden, moe_inter], as HF's checkpoint conversion fuses them."""
    pattern = re.compile(r"^(.*experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    fused: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, value in weights.items():
        match = pattern.match(name)
        if match is None:
            fused[name] = value
        else:
            experts.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = value
    for prefix, by_index in experts.items():
        order = sorted(by_index)
        fused[prefix + "gate_up_proj"] = np.stack([np.concatenate([by_index[e]["gate_proj"], by_index[e]["up_proj"]]) for e in order])
        fused[prefix + "down_proj"] = np.stack([by_index[e]["down_proj"] for e in order])
    return fused


def _load(module: torch.nn.Module, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """Every parameter and persistent buffer from the case's weights, by name (strict: nothing missing, nothing left over)."""
    tensors = {name: torch.from_numpy(np.asarray(value, dtype=np.float64)) for name, value in _fused_experts(weights).items()}
    module.load_state_dict(tensors, strict=True)  # copies round each float64 tensor once into the parameter's dtype
    return module


def _relative(weights: dict, prefix: str) -> dict:
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def _attention(cfg: dict, weights: dict):
    """HF's attention layer 0 with the case's weights, and the rotary embedding HF's model would hand it."""
    family = _attention_family(cfg)
    hf_config = _hf_config(cfg, family)
    classes = FAMILIES[family]
    attention = _to_model_dtype(_load(classes.attention(hf_config, layer_idx=0), weights), classes.model)
    rotary = _to_model_dtype(classes.rotary(hf_config), classes.model)
    return family, hf_config, attention, rotary


def _feed_forward(cfg: dict, weights: dict, layer: int):
    """HF's feed-forward block of ``layer`` (dense MLP or MoE) with the case's weights (relative to model.layers.{layer}.)."""
    family = _routing_family(cfg)
    hf_config = _hf_config(cfg, family, moe_only=True)
    classes = FAMILIES[family]
    block = classes.moe(hf_config) if layer >= hf_config.first_k_dense_replace else classes.mlp(hf_config)
    return _to_model_dtype(_load(block, _relative(weights, "mlp.")), classes.model)


def _model(cfg: dict, weights: dict):
    """HF's whole causal LM, built as HF builds it in the model dtype, with the case's weights (MTP modules left out)."""
    family = _model_family(cfg)
    model = FAMILIES[family].model._from_config(_hf_config(cfg, family), dtype=_dtype())
    layer_id = re.compile(r"^model\.layers\.(\d+)\.")
    main = {name: value for name, value in weights.items()
            if not (match := layer_id.match(name)) or int(match[1]) < cfg["num_hidden_layers"]}
    return _load(model, main).eval()


# ---------------------------------------------------------------------------- MLA

def _rope_to_hf(cfg: dict, family: str, k_rope: torch.Tensor) -> torch.Tensor:
    """A rotated k_pe from the spec's layout to the one HF's rotation yields: HF-V3 and V3.2 with interleaved pairs
    write the rotated pairs de-interleaved (evens then odds); V2's complex product and the half layout keep the order."""
    if family in ("v3", "v32") and cfg["rope_layout"] == "interleaved":
        return torch.cat([k_rope[..., 0::2], k_rope[..., 1::2]], dim=-1)
    return k_rope


def _rope_from_hf(cfg: dict, family: str, k_rope: torch.Tensor) -> torch.Tensor:
    if family in ("v3", "v32") and cfg["rope_layout"] == "interleaved":
        half = k_rope.shape[-1] // 2
        return torch.stack([k_rope[..., :half], k_rope[..., half:]], dim=-1).flatten(-2)
    return k_rope


def _run_attention(attention, rotary, hf_config, x: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor, cache=None):
    """One call of HF's attention as its decoder calls it: rotary embedding of the positions, HF's causal mask
    (always materialised for V3.2, whose indexer reads it: DeepseekV32Model passes allow_is_causal_skip=False)."""
    mask = create_causal_mask(config=hf_config, inputs_embeds=x, attention_mask=padding, cache=cache, position_ids=positions,
                              allow_is_causal_skip=not isinstance(attention, hf_v32.DeepseekV32Attention))
    return attention(hidden_states=x, position_embeddings=rotary(x, positions), attention_mask=mask, cache=cache)[0]


@torch.no_grad()
def mla_prefill(config, weights, hidden, start_positions):
    cfg = dict(config)
    _, hf_config, attention, rotary = _attention(cfg, weights)
    x = _tensor(hidden)  # [batch, seq, hidden]
    batch, seq = x.shape[:2]
    positions = torch.as_tensor(np.asarray(start_positions))[:, None] + torch.arange(seq)  # [batch, seq]
    output = _run_attention(attention, rotary, hf_config, x, positions, torch.ones(batch, seq, dtype=torch.bool))
    return {"output": _numpy(output)}


class Extension(NamedTuple):
    """One attention call after a cached prefix: its output, HF's cache after it, the prefix width and which new tokens are real."""

    output: torch.Tensor
    cache: DynamicCache
    max_len: int
    real: torch.Tensor  # [batch, seq, 1]


def _extend(cfg: dict, family: str, hf_config, attention, rotary, hidden, cache_rows, cache_lengths, query_lengths,
            index_key_rows=None) -> Extension:
    """HF's latent cache (normalised latent | rotated k_pe, 4-D single-head tensors) filled with the case's rows (and,
    for V3.2, HF's indexer key cache with ``index_key_rows``), ragged prefixes masked by HF's 2-D padding mask, the
    new tokens appended by HF's own cache update."""
    x = _tensor(hidden)  # [batch, seq, hidden]
    batch, seq = x.shape[:2]
    rows = _tensor(cache_rows)  # [batch, max_len, kv_lora_rank + qk_rope_head_dim]
    max_len, rank = rows.shape[1], cfg["kv_lora_rank"]
    lengths, query = torch.as_tensor(np.asarray(cache_lengths)), torch.as_tensor(np.asarray(query_lengths))
    cache = DynamicCache(config=hf_config)
    if max_len:
        cache.update(rows[:, None, :, :rank], _rope_to_hf(cfg, family, rows[:, None, :, rank:]), 0)
        if index_key_rows is not None:
            cache.update_indexer(_tensor(_index_keys_to_hf(index_key_rows)), 0)
    padding = torch.cat([torch.arange(max_len)[None] < lengths[:, None], torch.arange(seq)[None] < query[:, None]], dim=1)
    positions = lengths[:, None] + torch.arange(seq)  # [batch, seq]
    output = _run_attention(attention, rotary, hf_config, x, positions, padding, cache)
    return Extension(output, cache, max_len, padding[:, max_len:, None])


@torch.no_grad()
def mla_extend(config, weights, hidden, cache_rows, cache_lengths, query_lengths):
    cfg = dict(config)
    family, hf_config, attention, rotary = _attention(cfg, weights)
    _require(family != "v32", "a DSA layer needs the indexer's cached keys, which mla_extend does not carry (dsa_extend does)")
    run = _extend(cfg, family, hf_config, attention, rotary, hidden, cache_rows, cache_lengths, query_lengths)
    layer = run.cache.layers[0]
    new_rows = torch.cat([layer.keys[:, 0, run.max_len:], _rope_from_hf(cfg, family, layer.values[:, 0, run.max_len:])], dim=-1)
    return {"output": _numpy(run.output * run.real), "rows": _numpy(new_rows * run.real)}


def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    _require(False, "no FlashMLA-style kernel: HF's MLA expands the latent cache through kv_b_proj and attends per head; "
                    "it has no paged latent cache, absorbed 576-wide queries or softmax_scale argument to call")


# ---------------------------------------------------------------------------- DSA (DeepSeek-V3.2)

def _hadamard(width: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of a power-of-two ``width`` divided by sqrt(width): orthonormal and symmetric, its own inverse."""
    _require(width & (width - 1) == 0, f"the indexer cache conversion needs a power-of-two index_head_dim, got {width}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < width:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.sqrt(width)


def _index_keys_to_hf(index_key_rows) -> np.ndarray:
    """The case's indexer keys (after RoPE and the Hadamard, DSA.6) as HF caches them (after RoPE only: HF skips the
    Hadamard on q and k, which leaves every q.k unchanged); in float64, before the one rounding to the model dtype."""
    rows = np.asarray(index_key_rows, dtype=np.float64)  # [batch, max_len, index_head_dim]
    return rows @ _hadamard(rows.shape[-1])


def _index_keys_from_hf(keys: torch.Tensor) -> np.ndarray:
    return _numpy(keys) @ _hadamard(keys.shape[-1])  # [batch, seq, index_head_dim]


def _record_selection(attention) -> list:
    """HF's indexer's top-k of every call and the 3-D mask it scored under, recorded by a forward hook."""
    calls: list = []
    attention.indexer.register_forward_hook(lambda module, args, topk: calls.append((topk, args[3])))
    return calls


def _selected(topk: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's top-k positions with those its mask hides set to -1: HF takes topk(min(index_topk, keys)) whatever the
    query sees, so a query seeing fewer keys also gets masked (future or padding) ones, which its attention then masks
    again; these slots are the -1 padding of DSA.10."""
    visible = mask if mask.dtype == torch.bool else mask == 0  # HF's masks: bool, or additive 0 / finfo.min
    topk = topk.long()  # [batch, seq, selected]
    return torch.where(visible.gather(-1, topk), topk, -1)


@torch.no_grad()
def _sparse_prefill(config, weights, hidden, start_positions) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's DSA attention layer without a cache: its output and the indices its indexer selected."""
    cfg = dict(config)
    _, hf_config, attention, rotary = _attention(cfg, weights)
    calls = _record_selection(attention)
    x = _tensor(hidden)  # [batch, seq, hidden]
    batch, seq = x.shape[:2]
    positions = torch.as_tensor(np.asarray(start_positions))[:, None] + torch.arange(seq)  # [batch, seq]
    output = _run_attention(attention, rotary, hf_config, x, positions, torch.ones(batch, seq, dtype=torch.bool))
    return output, _selected(*calls[0])


def dsa_indexer(config, weights, hidden, start_positions):
    """HF's indexer as its attention layer calls it (HF returns no index scores: only the selection is checked)."""
    _, indices = _sparse_prefill(config, weights, hidden, start_positions)
    return {"indices": _numpy(indices)}


def dsa_prefill(config, weights, hidden, start_positions):
    output, indices = _sparse_prefill(config, weights, hidden, start_positions)
    return {"output": _numpy(output), "indices": _numpy(indices)}


@torch.no_grad()
def dsa_extend(config, weights, hidden, cache_rows, index_key_rows, cache_lengths, query_lengths):
    """As mla_extend, with HF's indexer key cache filled too; HF numbers the keys by cache slot (the padded prefix
    first), the spec by position: a new token's slot max_len + i is position cache_lengths[b] + i."""
    cfg = dict(config)
    family, hf_config, attention, rotary = _attention(cfg, weights)
    calls = _record_selection(attention)
    run = _extend(cfg, family, hf_config, attention, rotary, hidden, cache_rows, cache_lengths, query_lengths, index_key_rows)
    layer = run.cache.layers[0]
    new_rows = torch.cat([layer.keys[:, 0, run.max_len:], _rope_from_hf(cfg, family, layer.values[:, 0, run.max_len:])], dim=-1)
    slots = _selected(*calls[0])  # [batch, seq, selected]
    lengths = torch.as_tensor(np.asarray(cache_lengths))[:, None, None]
    positions = torch.where(slots >= run.max_len, slots - run.max_len + lengths, slots)
    return {"output": _numpy(run.output * run.real), "rows": _numpy(new_rows * run.real),
            "index_keys": _index_keys_from_hf(layer.indexer_keys[:, run.max_len:]) * _numpy(run.real),
            "indices": _numpy(torch.where(run.real, positions, -1))}


# ---------------------------------------------------------------------------- MoE

@torch.no_grad()
def moe_route(config, weights, hidden):
    cfg = dict(config)
    family = _routing_family(cfg)
    classes = FAMILIES[family]
    router = _load(classes.router(_hf_config(cfg, family, moe_only=True)), _relative(weights, "mlp.gate."))
    router = _to_model_dtype(router, classes.model)
    _, expert_weights, expert_ids = router(_tensor(hidden))  # [tokens, num_experts_per_tok] each
    return {"expert_ids": _numpy(expert_ids), "weights": _numpy(expert_weights)}


@torch.no_grad()
def moe_layer(config, weights, hidden, layer):
    block = _feed_forward(dict(config), weights, int(layer))
    chosen = []
    if hasattr(block, "gate"):  # the router's choice as HF's MoE block made it, for the checker's near-tie rule
        block.gate.register_forward_hook(lambda module, args, result: chosen.append(result[2]))
    output = block(_tensor(hidden)[None])[0]  # HF blocks take [batch, seq, hidden]
    return {"output": _numpy(output), **({"expert_ids": _numpy(chosen[0])} if chosen else {})}


def moe_balance(config, scores, expert_ids, bias):
    _require(False, "DeepseekV2/V3 compute no load-balancing loss and no correction-bias update (training rules MOE.14-MOE.17)")


def dispatch_plan(config, expert_ids, ranks):
    _require(False, "no expert-parallel dispatch list: HF's expert parallelism (base_model_ep_plan) exposes no (token, slot, expert) "
                    "plan per rank (MOE.18)")


# ---------------------------------------------------------------------------- the model

@torch.no_grad()
def model_logits(config, weights, tokens, query_lengths):
    cfg = dict(config)
    model = _model(cfg, weights)
    ids = torch.as_tensor(np.asarray(tokens))  # [batch, seq], right-padded
    real = torch.arange(ids.shape[1])[None] < torch.as_tensor(np.asarray(query_lengths))[:, None]
    logits = model(input_ids=ids, attention_mask=real.long()).logits  # [batch, seq, vocab]
    return {"logits": _numpy(logits * real[..., None])}


@torch.no_grad()
def greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps):
    """HF ``generate`` (greedy, no end token), the ragged prompts left-padded as HF expects them."""
    cfg = dict(config)
    model = _model(cfg, weights)
    prompts, lengths = np.asarray(prompt_tokens), np.asarray(prompt_lengths)
    batch, width = prompts.shape
    ids = torch.zeros(batch, width, dtype=torch.int64)
    mask = torch.zeros(batch, width, dtype=torch.int64)
    for b, length in enumerate(lengths):
        ids[b, width - length:] = torch.as_tensor(prompts[b, :length])
        mask[b, width - length:] = 1
    settings = GenerationConfig(do_sample=False, max_new_tokens=int(steps), min_new_tokens=int(steps), eos_token_id=None,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    result = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    return {"tokens": _numpy(result.sequences[:, width:]), "logits": _numpy(torch.stack(result.logits, dim=1))}


# ---------------------------------------------------------------------------- MTP

MTP_REASON = ("HF's MTP (transformers.modeling_layers.MtpModel, generate(use_mtp=True)) rotates each MTP row at the position "
              "of the token it embeds (config mtp_rope_position = token); the cases use the position of the hidden state it "
              "extends (hidden, as vLLM and SGLang serve DeepSeek-V3)")


def mtp_forward(config, weights, tokens, mtp_lambda):
    _require(False, MTP_REASON)


def mtp_draft(config, weights, prompt_tokens, prompt_lengths):
    _require(False, MTP_REASON)


def speculative_decode(config, weights, prompt_tokens, prompt_lengths, steps):
    _require(False, MTP_REASON)
