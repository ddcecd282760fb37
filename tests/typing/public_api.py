"""The public API as a strictly typed user calls it: ``mypy --strict`` over this file must pass (CI step 1).

Never run, only type-checked (``mypy --strict tests/typing/public_api.py``, config in
pyproject.toml): every name of ``mla_ref.__all__`` that can be called is called here with the
argument types its documentation promises, and its result used with the types it declares.
A public function without annotations fails it ("call to untyped function").
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import mla_ref
from mla_ref import (DispatchPlan, DraftContext, Drafter, FFNResult, GenerationResult, LatentCache, MLAResult, ModelCache,
                     ModelConfig, ModelResult, MTPDrafter, MTPLosses, NaiveCache, PagedLatentCache, Routing, SpeculativeResult,
                     Trace)

Array = npt.NDArray[np.float64]


def attention(config: ModelConfig, hidden: Array) -> tuple[Array, float]:
    weights: dict[str, npt.NDArray[np.float64]] = mla_ref.generate_attention_weights(config, seed=0)
    prefill: MLAResult = mla_ref.mla_forward(config, weights, hidden, start_positions=[0, 5000])
    cache = LatentCache.empty(config, batch=2)
    step = mla_ref.mla_forward(config, weights, hidden[:, :5], cache=cache, trace=Trace())
    step = mla_ref.mla_forward(config, weights, hidden[:, 5:6], cache=step.cache, query_lengths=[1, 1])
    paged = PagedLatentCache.empty(config, batch=2, max_tokens=16, block_size=4, dtype=np.float32)
    naive = NaiveCache.empty(config, batch=2).truncate([0, 0])
    mla_ref.mla_forward(config, weights, hidden, cache=paged)
    mla_ref.mla_forward(config, weights, hidden, cache=naive, attention="naive")
    out, lse = mla_ref.latent_attention_core(np.zeros((1, 1, 4, 64)), np.zeros((1, 16, 1, 64)), np.zeros((1, 1), np.int64),
                                             np.ones(1, np.int64), 32, 0.1, causal=True)
    shapes: dict[str, tuple[int, ...]] = mla_ref.attention_weight_shapes(config)
    return prefill.output + out.sum() + lse.sum() + len(shapes), float(step.lse.sum())


def routing(config: ModelConfig, hidden: Array) -> int:
    weights = mla_ref.generate_weights(config, seed=0, shapes=mla_ref.weight_shapes(config), dtype=np.float64)
    layer = {name.removeprefix("model.layers.1."): value for name, value in weights.items() if name.startswith("model.layers.1.")}
    chosen: Routing = mla_ref.route(config, layer, hidden, forced_expert_ids=None)
    ffn: FFNResult = mla_ref.ffn_forward(config, layer, hidden, 1, dtype=np.float32)
    names: list[str] = mla_ref.needed_expert_weight_names(config, 1, chosen.expert_ids)
    load = mla_ref.expert_load(config, chosen.expert_ids)
    bias = mla_ref.bias_update(config, np.zeros(config.n_routed_experts), load, speed=0.001)
    plan: DispatchPlan = mla_ref.dispatch_plan(config, chosen.expert_ids, 2)
    loss = mla_ref.sequence_balance_loss(config, chosen.scores[None], chosen.expert_ids[None]).loss
    v2 = mla_ref.v2_balance_losses(config, chosen.scores[None], chosen.expert_ids[None], devices=2)
    return len(names) + int(bias.sum()) + plan.ranks + int(loss.sum() + v2.expert_loss.sum()) + ffn.output.ndim


def model(config: ModelConfig) -> float:
    weights = mla_ref.generate_weights(config, seed=0)
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    greedy: GenerationResult = mla_ref.greedy_generate(config, weights, prompts, max_new_tokens=8)
    fast: SpeculativeResult = mla_ref.speculative_generate(config, weights, prompts, max_new_tokens=8)
    drafter: Drafter = MTPDrafter(config, weights)
    tokens = np.array([[1, 2, 3, 4, 5, 6]])
    forward: ModelResult = mla_ref.model_forward(config, weights, tokens, ModelCache.empty(config, 1), query_lengths=[6])
    losses: MTPLosses = mla_ref.mtp_losses(config, weights, tokens, mtp_lambda=0.3)
    hidden, logits, module_cache = mla_ref.mtp_module(config, weights, 1, forward.pre_norm_hidden[:, :5], tokens[:, 1:6])
    context = DraftContext(tokens, np.array([6]), forward.post_norm_hidden, 1)
    drafts = drafter(context)
    return (float(greedy.tokens.sum() + fast.verify_steps + losses.mtp_loss + hidden.sum() + logits.sum() + drafts.sum())
            + float(module_cache.lengths.sum()))


def configs() -> list[str]:
    config: ModelConfig = mla_ref.load_config("tiny")
    preset: ModelConfig = mla_ref.load_preset("deepseek-v3")
    version: str = mla_ref.spec_version()
    return [*mla_ref.preset_names(), str(config.to_dict()["hidden_size"]), str(preset.hidden_size), version]


def errors() -> list[str]:
    caught: list[mla_ref.MlaRefError] = [error("what", "problem", "SPEC") for error in (
        mla_ref.SpecError, mla_ref.ConfigError, mla_ref.WeightError, mla_ref.ShapeError, mla_ref.InputError, mla_ref.CacheError,
        mla_ref.GoldenError)]
    return [error.spec_id for error in caught]
