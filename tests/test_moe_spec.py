"""spec/moe.yaml <-> mla_ref: an instrumented run on every preset records exactly the declared outputs in exactly
the declared symbolic shapes. Step ids, docstrings and entry points: test_spec.py."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from mla_ref.balance import bias_update, expert_load, sequence_balance_loss, v2_balance_losses
from mla_ref.config import load_preset, preset_names
from mla_ref.dispatch import dispatch_plan
from mla_ref.moe import ffn_forward, moe_weight_names, needed_expert_weight_names, route
from mla_ref.spec import evaluate_shape, load_steps
from mla_ref.trace import Trace
from mla_ref.weights import generate_weights, layer_weight_shapes, subtree

STEPS = load_steps("moe.yaml")
BIG = ["deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "deepseek-v3.2", "kimi-k2"]


class ZeroWeights(Mapping):
    """Every tensor of one layer as zeros of its declared shape, router tensors overridden.

    Tensors of one shape share one read-only zero buffer, so the released shapes cost almost nothing.
    """

    _zeros: dict[tuple[int, ...], np.ndarray] = {}

    def __init__(self, config, layer, overrides):
        prefix = f"model.layers.{layer}."
        self.shapes = {name[len(prefix):]: shape for name, shape in layer_weight_shapes(config, layer).items()}
        self.overrides = overrides

    def __getitem__(self, name):
        if name in self.overrides:
            return self.overrides[name]
        shape = self.shapes[name]
        if shape not in self._zeros:
            self._zeros[shape] = np.zeros(shape)
            self._zeros[shape].flags.writeable = False
        return self._zeros[shape]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def layer_tensors(config, layer, full: bool):
    prefix = f"model.layers.{layer}."
    shapes = layer_weight_shapes(config, layer)
    if full:
        return subtree(generate_weights(config, 0, shapes=shapes), prefix)
    router = [name for name in moe_weight_names(config, layer, expert_ids=[]) if ".gate." in name] if config.is_moe_layer(layer) else []
    return ZeroWeights(config, layer, subtree(generate_weights(config, 0, names=router, shapes=shapes), prefix))


def instrumented_run(config, batch, seq, full):
    """Run every MOE step once into one trace; return it with the runtime symbols."""
    trace = Trace()
    hidden = np.random.default_rng(0).standard_normal((batch, seq, config.hidden_size))
    moe_layer = config.moe_layers[0]
    routing = ffn_forward(config, layer_tensors(config, moe_layer, full), hidden, moe_layer, trace=trace).routing
    dense = config if config.dense_layers else config.replace(first_k_dense_replace=1)  # tiny-mscale-mismatch: no dense layer
    ffn_forward(dense, layer_tensors(dense, 0, full), hidden, 0, trace=trace)
    load = expert_load(config, routing.expert_ids, trace=trace)
    with_bias = config if config.has_correction_bias else config.replace(topk_method="noaux_tc")
    bias_update(with_bias, np.zeros(config.n_routed_experts), load, trace=trace)
    scores = routing.scores.reshape(batch, seq, -1)
    ids = routing.expert_ids.reshape(batch, seq, -1)
    sequence_balance_loss(config, scores, ids, indicator="routed", trace=trace)
    v2_balance_losses(config, scores, ids, trace=trace)
    dispatch_plan(config, routing.expert_ids, config.n_group, trace=trace)
    symbols = {**config.symbols(), "tokens": batch * seq, "batch": batch, "seq": seq, "ranks": config.n_group}
    return trace, symbols


def check_declared_shapes(trace, symbols):
    assert sorted(trace.steps, key=lambda i: int(i.split(".")[1])) == [step["id"] for step in STEPS]
    for step in STEPS:
        recorded = trace[step["id"]]
        assert sorted(recorded) == sorted(step["outputs"]), step["id"]
        for name, shape in step["outputs"].items():
            assert recorded[name].shape == evaluate_shape(shape, symbols), f"{step['id']} {name}"


@pytest.mark.parametrize("preset", [name for name in preset_names() if name not in BIG])
def test_tiny_presets_yield_the_declared_shapes(preset):
    trace, symbols = instrumented_run(load_preset(preset), batch=2, seq=5, full=True)
    check_declared_shapes(trace, symbols)


@pytest.mark.parametrize("preset", BIG)
def test_released_presets_yield_the_declared_shapes(preset):
    """Generated router, zero expert / dense tensors of the released shapes, two tokens."""
    trace, symbols = instrumented_run(load_preset(preset), batch=1, seq=2, full=False)
    check_declared_shapes(trace, symbols)


def test_every_preset_is_covered():
    assert set(BIG) <= set(preset_names())


class GeneratedOnRead(Mapping):
    """A layer's tensors built by the weight generator when read, not kept: one expert in memory at a time."""

    def __init__(self, config, layer, seed, names):
        self.config, self.layer, self.seed = config, layer, seed
        self.prefix = f"model.layers.{layer}."
        self.shapes = layer_weight_shapes(config, layer)
        self.names = [name[len(self.prefix):] for name in names]
        self.read: list[str] = []

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        self.read.append(name)
        full = self.prefix + name
        return generate_weights(self.config, self.seed, names=[full], shapes=self.shapes)[full]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


@pytest.mark.slow
def test_deepseek_v3_layer_with_generated_experts():
    """One token through a DeepSeek-V3 MoE layer (256 experts, 8 groups, keep 4, top-8), building only its experts.

    Slow: every expert matrix is 2048 x 7168 and takes ~0.3 s to generate (8 experts + the shared one = 27 matrices).
    """
    config = load_preset("deepseek-v3")
    layer = config.moe_layers[0]
    hidden = np.random.default_rng(0).standard_normal((1, config.hidden_size))
    router = GeneratedOnRead(config, layer, 0, moe_weight_names(config, layer, expert_ids=[]))
    routing = route(config, router, hidden)
    needed = needed_expert_weight_names(config, layer, routing.expert_ids)
    assert len(needed) == 3 * config.num_experts_per_tok
    tensors = GeneratedOnRead(config, layer, 0, moe_weight_names(config, layer, expert_ids=[]) + needed)
    result = ffn_forward(config, tensors, hidden, layer)
    assert result.output.shape == (1, 7168) and np.isfinite(result.output).all()
    np.testing.assert_array_equal(result.routing.expert_ids, routing.expert_ids)
    per_group = config.n_routed_experts // config.n_group
    assert set((routing.expert_ids[0] // per_group).tolist()) <= set(routing.kept_groups[0].tolist())
    assert len(set(tensors.read)) == len(tensors.names)  # each needed tensor read, nothing else exists


def test_info_prints_the_routing_constants():
    from mla_ref.info import info_text

    v3 = info_text(load_preset("deepseek-v3"))
    for line in ("routed experts             256, top-8 per token, width 2048", "expert groups              8 of 32 experts, keep 4",
                 "score function             sigmoid", "correction bias            yes, selection only",
                 "group score rule           top2_sum", "dropped-group fill         -inf",
                 "renormalise top-k weights  yes (topk_norm_rule norm_topk_prob, norm_topk_prob true), epsilon 0.0",
                 "routed scaling factor      2.5", "bias update speed          0.001"):
        assert line in v3, line
    v2 = info_text(load_preset("deepseek-v2"))
    for line in ("expert groups              8 of 20 experts, keep 3", "score function             softmax",
                 "correction bias            no (topk_method group_limited_greedy)", "group score rule           max",
                 "renormalise top-k weights  no", "routed scaling factor      16.0", "bias update speed          unused"):
        assert line in v2, line
    assert "expert groups              1 (no group limit)" in info_text(load_preset("kimi-k2"))
