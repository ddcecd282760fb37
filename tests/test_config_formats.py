"""Config formats: the released checkpoints' config files in both transformers styles, format detection, contradictions."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mla_ref.config import detect_format, load_config, load_preset
from mla_ref.errors import ConfigError, ConfigWarning
from mla_ref.rope import softmax_scale

DATA = Path(__file__).parent / "data" / "configs"
CHECKPOINTS = {"deepseek-v3": "deepseek-v3", "deepseek-v3.1": "deepseek-v3", "deepseek-v3.2-exp": "deepseek-v3.2",
               "deepseek-v2": "deepseek-v2", "deepseek-v2-lite": "deepseek-v2-lite", "kimi-k2-0905": "kimi-k2"}
NOT_MODELLED: set[str] = set()  # keys read but not computed would warn (none since the DSA indexer, spec/dsa.yaml)


def _values(name: str, style: str) -> dict:
    return json.loads((DATA / f"{name}.{style}.json").read_text())


def _load(values: dict, checkpoint: str, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(values, **options)
    assert bool(caught) == (checkpoint in NOT_MODELLED), [str(w.message) for w in caught]
    return config


def _fields(config) -> dict:
    return {name: value for name, value in config.to_dict().items() if name not in ("name", "source")}


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_transformers_4_and_5_forms_load_to_the_preset(checkpoint):
    hf4 = _load(_values(checkpoint, "hf4"), checkpoint, strict=True)
    hf5 = _load(_values(checkpoint, "hf5"), checkpoint, strict=True)
    assert _fields(hf4) == _fields(hf5) == _fields(load_preset(CHECKPOINTS[checkpoint]))


def test_v32_layer_types_must_say_indexed_attention_in_every_layer():
    values = _values("deepseek-v3.2-exp", "hf5")
    assert load_config(values).index_topk == 2048
    with pytest.raises(ConfigError, match="layer_types"):
        load_config({**values, "layer_types": ["full_attention"] * values["num_hidden_layers"]})


def test_the_transformers_5_file_states_rope_theta_and_yarn_only_inside_rope_parameters():
    """The regression of issue 14: this form used to load as plain RoPE with the default theta."""
    values = _values("kimi-k2-0905", "hf5")
    assert "rope_theta" not in values and "rope_scaling" not in values
    config = load_config(values)
    assert config.rope_theta == 50000.0 and config.rope_scaling_type == "yarn" and config.rope_factor == 64.0


def test_transformers_5_v3_without_topk_method_routes_with_the_correction_bias():
    """transformers 5 writes no topk_method / scoring_func for deepseek_v3: its V3 always routes sigmoid + bias."""
    values = {key: value for key, value in _values("deepseek-v3", "hf5").items() if key not in ("topk_method", "scoring_func")}
    config = load_config(values)
    assert config.has_correction_bias and config.scoring_func == "sigmoid"


@pytest.mark.parametrize("name, preset", [("config_671B", "deepseek-v3"), ("config_v3.1", "deepseek-v3"), ("config_16B", "deepseek-v2-lite"),
                                          ("config_236B", "deepseek-v2")])
def test_official_configs_load_strictly(name, preset):
    config = load_config(str(DATA / f"official.{name}.json"), strict=True)
    reference = load_preset(preset)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group",
                  "topk_group", "q_lora_rank", "routed_scaling_factor", "has_correction_bias"):
        assert getattr(config, field) == getattr(reference, field), field
    assert config.yarn_active and config.rope_factor == 40.0


def test_v3_scale_from_both_styles_is_the_fact_sheet_value():
    for style in ("hf4", "hf5"):
        assert softmax_scale(load_config(_values("deepseek-v3", style))) == 0.1352337788608801  # facts 3: base * m^2


def test_format_detection():
    own = load_preset("tiny-yarn").to_dict()
    assert detect_format(own) == "mla-ref"
    assert detect_format(_values("deepseek-v3", "hf4")) == detect_format(_values("deepseek-v3", "hf5")) == "hf"
    assert detect_format(json.loads((DATA / "official.config_16B.json").read_text())) == "official"
    assert detect_format({"vocab_size": 10}) == "mla-ref"  # shared names only: every reading agrees


def test_a_misspelled_own_field_is_named_not_reread_as_hf():
    """Issue 14: one unknown key used to send an own-format config through the HF reader (softmax scale 0.144 for 0.27)."""
    values = dict(load_preset("tiny-yarn").to_dict(), n_grup=4)
    with pytest.raises(ConfigError, match=r"^n_grup: unknown config field \(did you mean 'n_group'\?\)"):
        load_config(values)


def test_mixed_formats_are_an_error():
    values = dict(load_preset("tiny-yarn").to_dict(), rope_scaling={"type": "yarn", "factor": 4})
    with pytest.raises(ConfigError, match=r"mixes the key sets of several formats.*CONFIG.format"):
        load_config(values)


def test_explicit_format_wins():
    values = {key: value for key, value in _values("deepseek-v3", "hf4").items() if key not in ("model_type", "architectures", "transformers_version")}
    assert _fields(load_config(values, format="hf")) == _fields(load_preset("deepseek-v3"))
    with pytest.raises(ConfigError, match=r"^format: expected one of"):
        load_config(values, format="json")


def test_unknown_hf_keys_warn_with_a_suggestion_and_fail_under_strict():
    values = dict(_values("deepseek-v2-lite", "hf4"), topk_methd="group_limited_greedy")
    with pytest.warns(ConfigWarning, match=r"topk_methd \(did you mean 'topk_method'\?\)"):
        load_config(values)
    with pytest.raises(ConfigError, match=r"^topk_methd: unknown config field \(did you mean 'topk_method'\?\)"):
        load_config(values, strict=True)


BAD_ROPE = [
    ({"rope_scaling": "yarn"}, r"^rope_scaling: expected an object"),
    ({"rope_scaling": {"factor": 40, "original_max_position_embeddings": 4096}}, r"^rope_scaling.type: missing"),
    ({"rope_scaling": {"type": "yarn", "factor": None, "original_max_position_embeddings": 4096}}, r"^rope_scaling.factor: required for yarn, got null"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, r"^rope_scaling.original_max_position_embeddings: required for yarn"),
    ({"rope_scaling": {"type": "linear", "factor": 4}}, r"^rope_scaling.type: expected 'yarn' or 'default', got 'linear'"),
    ({"rope_scaling": {"type": "yarn", "rope_type": "default", "factor": 4}}, r"^rope_scaling.rope_type: 'default' contradicts"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000, "factor": 40}}, r"^rope_parameters.factor: a YaRN parameter beside"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 20000, "factor": 40, "original_max_position_embeddings": 4096}},
     r"^rope_parameters.rope_theta: 20000 contradicts rope_theta = 10000"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 32, "original_max_position_embeddings": 4096}},
     r"^rope_parameters.factor: 32 contradicts rope_scaling.factor = 40"),
    ({"rope_interleave": "false"}, r"^rope_interleave: expected bool, got 'false'"),
    ({"norm_topk_prob": "true"}, r"^norm_topk_prob: expected bool, got 'true'"),
    ({"topk_method": "noaux-tc"}, r"^topk_method: expected str one of"),
    ({"head_dim": 128}, r"^head_dim: 128 contradicts the config's 64"),
    ({"num_key_value_heads": 1}, r"^num_key_value_heads: 1 contradicts"),
    ({"tie_word_embeddings": True}, r"^tie_word_embeddings: expected False"),
    ({"attention_bias": True}, r"^attention_bias: expected False"),
    ({"hidden_act": "gelu"}, r"^hidden_act: expected 'silu'"),
    ({"model_type": "llama"}, r"^model_type: expected one of"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "attention_factor": 1.2}},
     r"^rope_scaling.attention_factor: not supported"),
]


@pytest.mark.parametrize("change, message", BAD_ROPE)
def test_bad_hf_values_are_named(change, message):
    values = dict(_values("deepseek-v3", "hf4"), **change)
    with pytest.raises(ConfigError, match=message):
        load_config(values)


def test_rope_scaling_null_and_default_are_plain_rope():
    for change in ({"rope_scaling": None}, {"rope_scaling": {"type": "default"}}):
        config = load_config(dict(_values("deepseek-v3", "hf4"), **change))
        assert config.rope_scaling_type is None


def test_non_utf8_and_oversized_files(tmp_path):
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"config{suffix}"
        path.write_bytes(b'{"vocab_size": "\xff\xfe"}')
        with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte"):
            load_config(str(path))
