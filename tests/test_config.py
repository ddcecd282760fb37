"""Config: presets, Hugging Face and official json, and every constraint of spec/config.yaml."""

from __future__ import annotations

import json

import pytest

from mla_ref.config import from_dict, load_config, load_preset, preset_names
from mla_ref.errors import ConfigError

HF_V3 = {  # the fields of deepseek-ai/DeepSeek-V3 config.json that matter here (facts sheet 1.2)
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

OFFICIAL_16B = {  # DeepSeek-V3 inference/configs/config_16B.json (V2-Lite), facts sheet 1.2
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
    "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6,
    "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "mscale": 0.707,
}


@pytest.mark.parametrize("name", preset_names())
def test_presets_load_and_name_their_source(name):
    config = load_preset(name)
    assert config.name == name and config.source


def test_hf_config_json_equals_the_preset(tmp_path):
    path = tmp_path / "DeepSeek-V3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(HF_V3))
    from_file = load_config(str(path))
    preset = load_preset("deepseek-v3")
    differing = {f for f, v in preset.to_dict().items() if getattr(from_file, f) != v} - {"name", "source"}
    assert differing == set()


def test_hf_rope_type_spelling_and_layout_flag():
    values = dict(HF_V3, rope_interleave=False)
    values["rope_scaling"] = dict(HF_V3["rope_scaling"])
    values["rope_scaling"]["rope_type"] = values["rope_scaling"].pop("type")
    config = load_config(values)
    assert config.rope_scaling_type == "yarn" and config.rope_layout == "half"


def test_hf_config_without_mscale_all_dim_uses_hf_default():
    values = dict(HF_V3, rope_scaling={k: v for k, v in HF_V3["rope_scaling"].items() if k != "mscale_all_dim"})
    assert load_config(values).mscale_all_dim == 0.0


def test_official_json_maps_names_and_rules():
    from mla_ref.rope import softmax_scale
    config = load_config(OFFICIAL_16B)
    assert config.q_lora_rank is None and config.hidden_size == 2048 and config.num_experts_per_tok == 6
    assert config.mscale_all_dim == 0.707 and config.mscale == 0.707
    assert config.yarn_activation == "max_seq_len" and config.topk_norm_rule == "sigmoid_only"
    assert config.yarn_active  # default max_seq_len 16384 > 4096
    assert config.rope_factor == 40.0 and softmax_scale(config) == 0.1147213867929261  # OFF ModelArgs defaults


def test_official_671b_json_gets_the_v3_scale():
    """configs/config_671B.json leaves the YaRN fields to ModelArgs defaults (factor 40, mscale 1.0)."""
    from mla_ref.rope import softmax_scale
    official_671b = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                     "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                     "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                     "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                     "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
    config = load_config(official_671b)
    assert softmax_scale(config) == 0.1352337788608801 and config.has_correction_bias and config.group_rule == "top2_sum"


def test_our_own_dict_and_preset_files_round_trip(tmp_path):
    import yaml
    from mla_ref.config import preset_names
    from mla_ref.spec import spec_dir
    for name in preset_names():
        preset = load_preset(name)
        assert load_config(preset.to_dict()) == preset
        assert load_config(str(spec_dir() / "presets" / f"{name}.yaml")) == preset.replace(source=preset.source)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(load_preset("tiny-yarn").to_dict()))
    assert load_config(str(path)) == load_preset("tiny-yarn")


def test_ints_in_float_fields_are_the_same_config():
    values = dict(HF_V3, rope_scaling=dict(HF_V3["rope_scaling"], factor=40))
    from mla_ref.cache import config_fingerprint
    assert config_fingerprint(load_config(values)) == config_fingerprint(load_preset("deepseek-v3"))


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset or missing file 'deepseek-v9'.*CONFIG.presets"):
        load_config("deepseek-v9")


def test_unknown_field():
    with pytest.raises(ConfigError, match=r"kv_lora_rnak: unknown config field"):
        from_dict({**load_preset("tiny").to_dict(), "kv_lora_rnak": 3})


def test_missing_field():
    values = load_preset("tiny").to_dict()
    del values["hidden_size"]
    with pytest.raises(ConfigError, match=r"hidden_size: required field is missing.*CONFIG.hidden_size"):
        from_dict(values)


BAD_VALUES = [
    ("hidden_size", 0, r"hidden_size: expected int >= 1, got 0 \(CONFIG.hidden_size\)"),
    ("num_attention_heads", -2, r"num_attention_heads: expected int >= 1, got -2"),
    ("qk_rope_head_dim", 15, r"qk_rope_head_dim: expected int >= 2 even, got 15"),
    ("kv_lora_rank", 0, r"kv_lora_rank: expected int >= 1, got 0"),
    ("q_lora_rank", -1, r"q_lora_rank: expected int >= 1 or null, got -1"),
    ("rope_factor", 0.5, r"rope_factor: expected float >= 1.0, got 0.5"),
    ("hidden_size", 64.0, r"hidden_size: expected int >= 1, got 64.0 \(float\)"),
    ("norm_topk_prob", 1, r"norm_topk_prob: expected bool, got 1"),
    ("num_attention_heads", True, r"num_attention_heads: expected int >= 1, got True"),
    ("rms_norm_eps", float("nan"), r"rms_norm_eps: expected a finite float"),
    ("rope_layout", "neox", r"rope_layout: expected str one of \['interleaved', 'half'\], got 'neox'"),
    ("scoring_func", "relu", r"scoring_func: expected str one of"),
    ("v_head_dim", None, r"v_head_dim: expected int >= 1, got null"),
]


@pytest.mark.parametrize("field, value, message", BAD_VALUES)
def test_field_constraints(field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("tiny").replace(**{field: value})


CROSS_FIELD = [
    ({"n_routed_experts": 15}, r"n_routed_experts: expected a multiple of n_group = 4, got 15 \(CONFIG.R1\)"),
    ({"topk_group": 5}, r"topk_group: expected <= n_group = 4, got 5 \(CONFIG.R2\)"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok: expected <= experts in the kept groups \(2 x 4 = 8\), got 9 \(CONFIG.R3\)"),
    ({"beta_fast": 0.5}, r"beta_fast: expected >= beta_slow = 1.0, got 0.5 \(CONFIG.R4\)"),
    ({"first_k_dense_replace": 4}, r"first_k_dense_replace: expected <= num_hidden_layers = 3, got 4 \(CONFIG.R5\)"),
]


@pytest.mark.parametrize("changes, message", CROSS_FIELD)
def test_cross_field_rules(changes, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("tiny").replace(**changes)


def test_equal_betas_are_allowed_for_kimi_k2():
    config = load_preset("kimi-k2")
    assert config.beta_fast == config.beta_slow == 1.0


def test_config_is_frozen():
    config = load_preset("tiny")
    with pytest.raises(AttributeError):
        config.hidden_size = 3


def test_bad_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON config"):
        load_config(str(path))
