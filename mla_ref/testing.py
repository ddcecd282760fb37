"""Hypothesis strategies over configs and inputs, for fuzzing an implementation against the reference.

Needs ``hypothesis`` (a test dependency, not a runtime one)::

    from hypothesis import given
    from mla_ref import testing

    @given(testing.configs(), testing.data())
    def test_my_mla_matches(config, data):
        hidden = data.draw(testing.hidden_states(config))
        weights = generate_attention_weights(config, seed=0)
        expected = mla_forward(config, weights, hidden).output
        assert np.allclose(my_mla(config, weights, hidden), expected, rtol=1e-10, atol=1e-12)

Every config drawn is valid and small (widths <= 48, <= 3 layers): it runs in milliseconds.
:func:`hf_config_dicts` writes a drawn config as a Hugging Face ``config.json`` in either
transformers style, for testing a config loader; :func:`invalid_field_values` draws one
field / value pair that spec/config.yaml forbids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from .config import ModelConfig, field_specs, from_dict

data = st.data


@st.composite
def configs(draw, yarn: bool | None = None, max_width: int = 48) -> ModelConfig:
    """A valid small config: MLA widths, RoPE or YaRN, V2- or V3-style routing, MTP depth 0-2."""
    heads = draw(st.integers(1, 4))
    n_group = draw(st.sampled_from([1, 2, 4]))
    experts = n_group * draw(st.integers(1, 4))
    topk_group = draw(st.integers(1, n_group))
    experts_per_tok = draw(st.integers(1, topk_group * experts // n_group))
    sigmoid = draw(st.booleans())
    use_yarn = draw(st.booleans()) if yarn is None else yarn
    layers = draw(st.integers(1, 3))
    values: dict[str, Any] = {
        "name": "hypothesis", "vocab_size": draw(st.integers(8, 64)), "hidden_size": draw(st.integers(8, max_width)),
        "num_hidden_layers": layers, "max_position_embeddings": 4096, "num_attention_heads": heads,
        "q_lora_rank": draw(st.one_of(st.none(), st.integers(4, max_width))), "kv_lora_rank": draw(st.integers(4, max_width)),
        "qk_nope_head_dim": draw(st.integers(2, 24)), "qk_rope_head_dim": 2 * draw(st.integers(1, 12)), "v_head_dim": draw(st.integers(2, 24)),
        "rope_theta": draw(st.sampled_from([10000.0, 50000.0, 500.0])),
        "intermediate_size": draw(st.integers(4, max_width)), "moe_intermediate_size": draw(st.integers(4, max_width)),
        "n_routed_experts": experts, "n_shared_experts": draw(st.integers(0, 2)), "num_experts_per_tok": experts_per_tok,
        "n_group": n_group, "topk_group": topk_group, "first_k_dense_replace": draw(st.integers(0, layers)),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "norm_topk_prob": draw(st.booleans()), "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5, 16.0])),
        "num_nextn_predict_layers": draw(st.integers(0, 2)),
    }
    if use_yarn:
        beta_slow = draw(st.sampled_from([1.0, 2.0]))
        values.update(rope_scaling_type="yarn", rope_factor=draw(st.sampled_from([4.0, 40.0])), original_max_position_embeddings=256,
                      beta_fast=draw(st.sampled_from([beta_slow, 32.0])), beta_slow=beta_slow,
                      mscale=(mscale := draw(st.sampled_from([0.707, 1.0]))), mscale_all_dim=mscale)
    return from_dict(values)


def hidden_states(config: ModelConfig, max_batch: int = 2, max_seq: int = 5, scale: float = 4.0) -> st.SearchStrategy[np.ndarray]:
    """Finite float64 ``hidden [batch, seq, hidden_size]`` with entries in [-scale, scale]."""
    return st.tuples(st.integers(1, max_batch), st.integers(1, max_seq)).flatmap(
        lambda shape: st.lists(st.floats(-scale, scale, allow_nan=False, allow_infinity=False),
                               min_size=shape[0] * shape[1] * config.hidden_size, max_size=shape[0] * shape[1] * config.hidden_size)
        .map(lambda flat: np.array(flat, np.float64).reshape(shape[0], shape[1], config.hidden_size)))


def token_ids(config: ModelConfig, max_batch: int = 2, max_seq: int = 6) -> st.SearchStrategy[np.ndarray]:
    """Token ids ``[batch, seq]`` within the vocabulary."""
    return st.tuples(st.integers(1, max_batch), st.integers(1, max_seq)).flatmap(
        lambda shape: st.lists(st.integers(0, config.vocab_size - 1), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])
        .map(lambda flat: np.array(flat, np.int64).reshape(shape)))


def hf_config_dict(config: ModelConfig, style: str = "transformers5", model_type: str = "deepseek_v3") -> dict[str, Any]:
    """``config`` as a Hugging Face ``config.json`` dict: ``transformers4`` (rope_theta + rope_scaling) or ``transformers5`` (rope_parameters)."""
    if style not in ("transformers4", "transformers5"):
        raise ValueError(f"style: expected transformers4 or transformers5, got {style!r}")
    values: dict[str, Any] = {"model_type": model_type}
    for field, spec in field_specs().items():
        external = spec.get("hf")
        if external and "." not in str(external) and field != "rope_layout":
            values[str(external)] = getattr(config, field)
    values["rope_interleave"] = config.rope_layout == "interleaved"
    rope: dict[str, Any] = {"type": "default"}
    if config.rope_scaling_type == "yarn":
        rope = {"type": "yarn", "factor": config.rope_factor, "original_max_position_embeddings": config.original_max_position_embeddings,
                "beta_fast": config.beta_fast, "beta_slow": config.beta_slow, "mscale": config.mscale,
                "mscale_all_dim": config.mscale_all_dim, "truncate": config.yarn_truncate}
    if style == "transformers4":
        values["rope_theta"] = config.rope_theta
        values["rope_scaling"] = rope if config.rope_scaling_type == "yarn" else None
    else:
        values["rope_parameters"] = {**rope, "rope_type": rope["type"], "rope_theta": config.rope_theta}
        values.update(head_dim=config.qk_rope_head_dim, qk_head_dim=config.qk_head_dim, num_key_value_heads=config.num_attention_heads)
    return values


@st.composite
def hf_config_dicts(draw, style: str | None = None) -> tuple[dict[str, Any], ModelConfig]:
    """``(config.json dict, the config it must load to)`` in a drawn or given transformers style."""
    config = draw(configs())
    chosen = style or draw(st.sampled_from(["transformers4", "transformers5"]))
    return hf_config_dict(config, chosen), config


_BROKEN = {"int": [0, -1, 2**31, 1.5, "8", True, None], "float": [float("nan"), float("inf"), -1.0, "1.0", None],
           "bool": ["true", 1, None], "str": ["no-such-choice", 3, None]}


@st.composite
def invalid_field_values(draw) -> tuple[str, Any]:
    """``(field, value)`` that spec/config.yaml rejects for that field (ConfigError naming it)."""
    specs = field_specs()
    candidates = []
    for field, spec in specs.items():
        if field in ("name", "source"):
            continue
        for value in _BROKEN[spec["type"]]:
            if value is None and spec.get("nullable"):
                continue
            if spec["type"] == "float" and value == -1.0 and "min" not in spec and "min_exclusive" not in spec:
                continue
            if spec["type"] == "int" and value in (0, -1) and spec.get("min", 1) <= value:
                continue
            candidates.append((field, value))
    return draw(st.sampled_from(candidates))
