"""CONFIG — one frozen, validated configuration for MLA, MoE and MTP (spec/config.yaml).

Build one with :func:`load_config` from a preset name, a dict of our field names, a
Hugging Face ``config.json`` (path or dict) or a DeepSeek-V3 official ``ModelArgs`` json.
Field types, defaults and constraints are read from ``spec/config.yaml``: the spec is the
single place they are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .spec import load_spec_file, read_yaml, spec_dir


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """All fields of spec/config.yaml; see there for meaning, constraints and names."""

    name: str
    source: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float
    rope_scaling_type: str | None
    rope_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    yarn_truncate: bool
    yarn_activation: str
    max_seq_len: int
    rope_layout: str
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str
    topk_method: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    group_score_rule: str | None
    group_mask_fill: str
    topk_norm_rule: str
    topk_norm_epsilon: float
    bias_update_speed: float
    aux_loss_alpha: float
    num_nextn_predict_layers: int
    mtp_concat_order: str
    mtp_hidden_source: str
    mtp_rope_position: str
    mtp_depths: int | None
    mtp_module_reuse: str

    def __post_init__(self) -> None:
        _validate(self)
        for name, spec in field_specs().items():  # 40 and 40.0 are one config (the cache fingerprint hashes values)
            value = getattr(self, name)
            if spec["type"] == "float" and value is not None and not isinstance(value, float):
                object.__setattr__(self, name, float(value))

    # ------------------------------------------------------------ derived (config.yaml)
    @property
    def qk_head_dim(self) -> int:
        """``qk_nope_head_dim + qk_rope_head_dim`` (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_cache_width(self) -> int:
        """``kv_lora_rank + qk_rope_head_dim``: one latent cache row (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn_active(self) -> bool:
        """Whether YaRN frequencies, amplitude and m^2 apply (CONFIG yarn_activation)."""
        if self.rope_scaling_type != "yarn":
            return False
        return self.yarn_activation == "always" or self.max_seq_len > self.original_max_position_embeddings

    @property
    def group_rule(self) -> str:
        """The group score rule in use: ``group_score_rule``, or when null top2_sum for noaux_tc (V3) and max otherwise (V2)."""
        if self.group_score_rule is not None:
            return self.group_score_rule
        return "top2_sum" if self.topk_method == "noaux_tc" else "max"

    @property
    def has_correction_bias(self) -> bool:
        """``topk_method == 'noaux_tc'``: the gate has a selection-only bias."""
        return self.topk_method == "noaux_tc"

    @property
    def shared_expert_width(self) -> int:
        """Inner width of the shared-experts MLP."""
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def mtp_num_depths(self) -> int:
        """D: ``mtp_depths``, or num_nextn_predict_layers when null."""
        return self.num_nextn_predict_layers if self.mtp_depths is None else self.mtp_depths

    def mtp_module_of_depth(self, depth: int) -> int:
        """The MTP module (1-based) serving depth k: k, or ((k - 1) mod num_nextn_predict_layers) + 1 with reuse (MTP.3)."""
        return depth if self.mtp_module_reuse == "none" else (depth - 1) % self.num_nextn_predict_layers + 1

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` uses MoE iff ``layer >= first_k_dense_replace`` and ``layer % moe_layer_freq == 0``."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def dense_layers(self) -> list[int]:
        """Indices of the layers with the dense MLP."""
        return [layer for layer in range(self.num_hidden_layers) if not self.is_moe_layer(layer)]

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers."""
        return [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]

    def symbols(self) -> dict[str, int]:
        """Config symbols usable in spec shapes: every int field plus derived widths."""
        table = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), int) and not isinstance(getattr(self, f.name), bool)}
        table.update(qk_head_dim=self.qk_head_dim, latent_cache_width=self.latent_cache_width,
                     shared_expert_width=self.shared_expert_width, rope_half=self.qk_rope_head_dim // 2)
        return table

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (the form :func:`from_dict` reads)."""
        return dataclasses.asdict(self)


def field_specs() -> dict[str, dict]:
    """The ``fields`` table of spec/config.yaml."""
    return load_spec_file("config.yaml")["fields"]


_PY_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _describe(spec: Mapping[str, Any]) -> str:
    parts = [spec["type"]]
    if "min" in spec:
        parts.append(f">= {spec['min']}")
    if "min_exclusive" in spec:
        parts.append(f"> {spec['min_exclusive']}")
    if spec.get("even"):
        parts.append("even")
    if "choices" in spec:
        parts.append(f"one of {spec['choices']}")
    if spec.get("nullable"):
        parts.append("or null")
    return " ".join(parts)


def _check_field(name: str, value: Any, spec: Mapping[str, Any]) -> None:
    where = f"CONFIG.{name}"
    if value is None:
        if spec.get("nullable"):
            return
        raise ConfigError(name, f"expected {_describe(spec)}, got null", where)
    allowed = _PY_TYPES[spec["type"]]
    if isinstance(value, bool) and spec["type"] != "bool" or not isinstance(value, allowed):
        raise ConfigError(name, f"expected {_describe(spec)}, got {value!r} ({type(value).__name__})", where)
    if spec["type"] == "float" and not math.isfinite(value):
        raise ConfigError(name, f"expected a finite {_describe(spec)}, got {value!r}", where)
    if "min" in spec and value < spec["min"]:
        raise ConfigError(name, f"expected {_describe(spec)}, got {value!r}", where)
    if "min_exclusive" in spec and value <= spec["min_exclusive"]:
        raise ConfigError(name, f"expected {_describe(spec)}, got {value!r}", where)
    if spec.get("even") and value % 2:
        raise ConfigError(name, f"expected {_describe(spec)}, got {value!r}", where)
    if "choices" in spec and value not in spec["choices"]:
        raise ConfigError(name, f"expected {_describe(spec)}, got {value!r}", where)


def _validate(config: ModelConfig) -> None:
    specs = field_specs()
    for name, spec in specs.items():
        _check_field(name, getattr(config, name), spec)
    c = config
    if c.n_routed_experts % c.n_group:
        raise ConfigError("n_routed_experts", f"expected a multiple of n_group = {c.n_group}, got {c.n_routed_experts}", "CONFIG.R1")
    if c.topk_group > c.n_group:
        raise ConfigError("topk_group", f"expected <= n_group = {c.n_group}, got {c.topk_group}", "CONFIG.R2")
    available = c.topk_group * (c.n_routed_experts // c.n_group)
    if c.num_experts_per_tok > available:
        raise ConfigError("num_experts_per_tok",
                          f"expected <= experts in the kept groups ({c.topk_group} x {c.n_routed_experts // c.n_group} = {available}), got {c.num_experts_per_tok}",
                          "CONFIG.R3")
    if c.beta_fast < c.beta_slow:
        raise ConfigError("beta_fast", f"expected >= beta_slow = {c.beta_slow}, got {c.beta_fast}", "CONFIG.R4")
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise ConfigError("first_k_dense_replace", f"expected <= num_hidden_layers = {c.num_hidden_layers}, got {c.first_k_dense_replace}", "CONFIG.R5")
    if c.rope_scaling_type == "yarn" and c.original_max_position_embeddings > c.max_position_embeddings:
        raise ConfigError("original_max_position_embeddings",
                          f"expected <= max_position_embeddings = {c.max_position_embeddings}, got {c.original_max_position_embeddings}", "CONFIG.R6")
    if c.mtp_depths is not None and c.mtp_module_reuse == "none" and c.mtp_depths > c.num_nextn_predict_layers:
        raise ConfigError("mtp_depths", f"expected <= num_nextn_predict_layers = {c.num_nextn_predict_layers} with mtp_module_reuse "
                          f"'none' (set modulo or recurrent to reuse modules), got {c.mtp_depths}", "CONFIG.R7")
    modules, reuse = c.num_nextn_predict_layers, c.mtp_module_reuse
    if (reuse == "modulo" and modules < 1) or (reuse == "recurrent" and modules != 1):
        expected = ">= 1" if reuse == "modulo" else "== 1 (the recurrent scheme is specified for one module)"
        raise ConfigError("num_nextn_predict_layers", f"expected {expected} with mtp_module_reuse {reuse!r}, got {modules}", "CONFIG.R8")


def from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """Build a config from our field names; missing fields take the spec default."""
    if not isinstance(values, Mapping):
        raise ConfigError("config", f"expected a mapping of field names, got {type(values).__name__}", "CONFIG")
    specs = field_specs()
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config field (known: see spec/config.yaml); all unknown: {unknown}", "CONFIG")
    kwargs = {}
    for name, spec in specs.items():
        if name in values:
            kwargs[name] = values[name]
        elif "default" in spec:
            kwargs[name] = spec["default"]
        else:
            raise ConfigError(name, f"required field is missing (expected {_describe(spec)})", f"CONFIG.{name}")
    if kwargs["q_lora_rank"] == 0:
        kwargs["q_lora_rank"] = None
    return ModelConfig(**kwargs)


def preset_names() -> list[str]:
    """Names of the presets in spec/presets/."""
    return sorted(path.stem for path in (spec_dir() / "presets").glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    """The config of preset ``name`` (spec/presets/<name>.yaml)."""
    names = preset_names()
    if name not in names:
        raise ConfigError("preset", f"unknown preset {name!r}; expected one of {names}", "CONFIG.presets")
    data = load_spec_file(f"presets/{name}.yaml")
    if not isinstance(data.get("config"), dict):
        raise ConfigError(f"presets/{name}.yaml: config", "expected a mapping of config fields", "CONFIG.presets")
    return from_dict({"name": name, "source": str(data.get("source", "")), **data["config"]})


def from_hf(values: Mapping[str, Any], name: str = "hf-config") -> ModelConfig:
    """Read a Hugging Face ``config.json`` dict (deepseek_v2, deepseek_v3, kimi_k2)."""
    mapped: dict[str, Any] = {"name": name, "source": "Hugging Face config.json"}
    for field, spec in field_specs().items():
        node: Any = values
        external = spec.get("hf")
        if not external or field == "rope_layout":
            continue
        for part in str(external).split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            mapped[field] = node
    scaling = values.get("rope_scaling")
    if isinstance(scaling, Mapping):
        kind = scaling.get("type", scaling.get("rope_type"))
        mapped["rope_scaling_type"] = kind
        if kind not in (None, "yarn"):
            raise ConfigError("rope_scaling.type", f"expected 'yarn' or absent, got {kind!r}", "CONFIG.rope_scaling_type")
    if "rope_interleave" in values:
        mapped["rope_layout"] = "interleaved" if values["rope_interleave"] else "half"
    if "topk_method" not in mapped and values.get("n_routed_experts") is not None:
        mapped["topk_method"] = "greedy"
    return from_dict(mapped)


# OFF ModelArgs defaults for the fields its configs/*.json leave out (inference/model.py).
OFFICIAL_DEFAULTS = {"vocab_size": 102400, "rope_theta": 10000.0, "rope_factor": 40.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "max_seq_len": 16384}


def from_official(values: Mapping[str, Any], name: str = "official-config") -> ModelConfig:
    """Read a DeepSeek-V3 official ``ModelArgs`` json (configs/config_671B.json...).

    OFF has no rope type (YaRN fields always present, switched by max_seq_len), no
    amplitude factor (mscale is set equal to mscale_all_dim) and no topk_method: the
    correction bias exists in OFF only when dim == 7168 — a bug for custom configs — so
    we key it on sigmoid scoring instead and say so in spec/config.yaml.
    """
    mapped: dict[str, Any] = {"name": name, "source": "DeepSeek-V3 official ModelArgs json", **OFFICIAL_DEFAULTS}
    for field, spec in field_specs().items():
        external = spec.get("official")
        if external and external in values:
            mapped[field] = values[external]
    mapped["mscale"] = mapped["mscale_all_dim"]
    mapped["rope_scaling_type"] = "yarn"
    mapped["yarn_activation"] = "max_seq_len"
    mapped.setdefault("max_position_embeddings", max(mapped.get("max_seq_len", 16384),
                                                     mapped.get("original_max_position_embeddings", 4096)))
    sigmoid = mapped.get("scoring_func", "softmax") == "sigmoid"
    mapped["topk_method"] = "noaux_tc" if sigmoid else ("group_limited_greedy" if mapped.get("n_group", 1) > 1 else "greedy")
    mapped["topk_norm_rule"] = "sigmoid_only"
    return from_dict(mapped)


def load_config(source: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A config from a preset name, a json/yaml path, a dict, or a config (returned as is).

    A dict or file is read as Hugging Face if it has ``hidden_size``, as official if it
    has ``dim``, else as our own field names.
    """
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, Mapping):
        return _from_any_dict(source, source.get("name", "config") if "name" in source else "config")
    text = str(source)
    if text in preset_names():
        return load_preset(text)
    path = Path(text)
    if not path.is_file():
        raise ConfigError("preset", f"unknown preset or missing file {text!r}; presets: {preset_names()}", "CONFIG.presets")
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(str(path), f"not a readable JSON config: {exc}", "CONFIG") from None
    else:
        values = read_yaml(path)
    if not isinstance(values, Mapping):
        raise ConfigError(str(path), f"expected a JSON/YAML object, got {type(values).__name__}", "CONFIG")
    return _from_any_dict(values, path.parent.name if path.name == "config.json" else path.stem)


def _from_any_dict(values: Mapping[str, Any], name: str) -> ModelConfig:
    """Our own field names (every key a field), a preset file (a ``config`` mapping), else HF or official json."""
    if set(values) <= set(field_specs()):
        return from_dict(values)
    if isinstance(values.get("config"), Mapping) and "spec_version" in values:
        return from_dict({"name": name, "source": str(values.get("source", "")), **values["config"]})
    if "hidden_size" in values:
        return from_hf(values, name=str(values.get("_name_or_path") or name))
    if "dim" in values:
        return from_official(values, name=name)
    return from_dict(values)


def cache_values_per_token(config: ModelConfig) -> dict[str, float]:
    """Cached values per token per layer (config.yaml cache_values_per_token_per_layer)."""
    per_kv_head = config.qk_head_dim + config.v_head_dim
    return {
        "latent": config.latent_cache_width,
        "naive": config.num_attention_heads * per_kv_head,
        "mha": config.num_attention_heads * per_kv_head,
        "gqa8": min(8, config.num_attention_heads) * per_kv_head,
        "gqa_equal_kv_heads": config.latent_cache_width / per_kv_head,
        "paper_mha": 2 * config.num_attention_heads * config.v_head_dim,
    }
