"""CONFIG — one frozen, validated configuration for MLA, MoE and MTP (spec/config.yaml).

Build one with :func:`load_config` from a preset name, a dict of our field names, a
Hugging Face ``config.json`` (path or dict) or a DeepSeek-V3 official ``ModelArgs`` json.
Field types, defaults and constraints are read from ``spec/config.yaml``: the spec is the
single place they are written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, ConfigWarning, SpecError, clip_text, shown
from .spec import load_spec_file, parse_yaml, spec_dir


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
    index_n_heads: int | None
    index_head_dim: int | None
    index_topk: int | None
    index_norm_eps: float
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
    def sparse_attention(self) -> bool:
        """Whether the layer runs DeepSeek Sparse Attention (spec/dsa.yaml): ``index_topk`` is set (CONFIG.R10)."""
        return self.index_topk is not None

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


INT_LIMIT = 2**31 - 1  # CONFIG.limits
_PY_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _describe(spec: Mapping[str, Any]) -> str:
    parts = [spec["type"]]
    if "min" in spec:
        parts.append(f">= {spec['min']}")
    if "max" in spec:
        parts.append(f"<= {spec['max']}")
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
        raise ConfigError(name, f"expected {_describe(spec)}, got {shown(value)} ({type(value).__name__})", where)
    if spec["type"] == "int" and abs(value) > INT_LIMIT:
        raise ConfigError(name, f"expected {_describe(spec)} and <= {INT_LIMIT}, got an int of {len(str(abs(value)))} digits", "CONFIG.limits")
    if spec["type"] == "float" and not math.isfinite(value):
        raise ConfigError(name, f"expected a finite {_describe(spec)}, got {value!r}", where)
    if ("min" in spec and value < spec["min"] or "max" in spec and value > spec["max"]
            or "min_exclusive" in spec and value <= spec["min_exclusive"] or spec.get("even") and value % 2
            or "choices" in spec and value not in spec["choices"]):
        raise ConfigError(name, f"expected {_describe(spec)}, got {shown(value)}", where)


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
    _check_indexer(config)
    _check_derived_constants(config)


def _check_indexer(config: ModelConfig) -> None:
    """CONFIG.R10 — the DSA indexer fields are all set or all null; a power-of-two key width covering the rope dims; a query latent."""
    fields = {"index_n_heads": config.index_n_heads, "index_head_dim": config.index_head_dim, "index_topk": config.index_topk}
    missing = [name for name, value in fields.items() if value is None]
    if not missing:
        width = config.index_head_dim
        if width & (width - 1) or width < config.qk_rope_head_dim:
            raise ConfigError("index_head_dim", f"expected a power of two >= qk_rope_head_dim = {config.qk_rope_head_dim}, got {width}", "CONFIG.R10")
        if config.q_lora_rank is None:
            raise ConfigError("q_lora_rank", "expected an int: the DSA indexer query reads the query latent c_q (index_topk is set), got null", "CONFIG.R10")
    elif len(missing) < len(fields):
        given = [name for name in fields if name not in missing]
        raise ConfigError(missing[0], f"expected an int beside {given} (the DSA indexer needs all three), got null", "CONFIG.R10")


def _check_derived_constants(config: ModelConfig) -> None:
    """CONFIG.R9 — the derived softmax scale and RoPE amplitude are finite and positive."""
    from .rope import rope_amplitude, softmax_scale  # rope reads configs: imported when the first config is checked
    for name, field, value in (("softmax_scale", "mscale_all_dim", softmax_scale(config)), ("rope_amplitude", "mscale", rope_amplitude(config))):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(field, f"gives {name} = {value!r} (rope_factor {config.rope_factor!r}); expected a finite value > 0", "CONFIG.R9")


def from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """Build a config from our field names; missing fields take the spec default."""
    if not isinstance(values, Mapping):
        raise ConfigError("config", f"expected a mapping of field names, got {type(values).__name__}", "CONFIG")
    specs = field_specs()
    _unknown_keys(sorted(str(key) for key in values if key not in specs), set(specs), "", True, fatal=True)
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
    return _from_preset_file(load_spec_file(f"presets/{name}.yaml"), name)


def format_specs() -> dict[str, dict]:
    """The ``formats`` table of spec/config.yaml (markers, HF rope keys, model types, ignored keys)."""
    return load_spec_file("config.yaml")["formats"]


FORMATS = ("mla-ref", "preset", "hf", "official")
PRESET_FILE_KEYS = ("spec_version", "source", "uncertain", "config")


def _hf_top_level_keys() -> set[str]:
    hf = format_specs()["hf"]
    mapped = {str(spec["hf"]) for spec in field_specs().values() if spec.get("hf") and "." not in str(spec["hf"])}
    return (mapped | {"rope_theta", "rope_scaling", "rope_parameters", "rope_interleave"} | set(hf["markers"]) | set(hf["fixed"])
            | set(hf["derived"]) | set(hf["not_modelled"]) | set(hf["ignored"]))


def _official_keys() -> set[str]:
    return {spec["official"] for spec in field_specs().values() if spec.get("official")} | set(format_specs()["official"]["ignored"])


def detect_format(values: Mapping[str, Any]) -> str:
    """Which format a mapping is written in (spec/config.yaml ``formats``): marker first, else the recognised key set."""
    if set(values) & set(format_specs()["hf"]["markers"]):
        return "hf"
    if "spec_version" in values and isinstance(values.get("config"), Mapping):
        return "preset"
    known = {"mla-ref": set(field_specs()), "hf": _hf_top_level_keys(), "official": _official_keys()}
    deciding = {}
    for name, names in known.items():
        others = set().union(*(other_names for other, other_names in known.items() if other != name))
        only_this_format = sorted(key for key in values if key in names and key not in others)
        if only_this_format:
            deciding[name] = only_this_format
    if len(deciding) > 1:
        listed = "; ".join(f"{name}: {found[:4]}" for name, found in deciding.items())
        raise ConfigError("config", f"mixes the key sets of several formats ({listed}); pass format= to say which", "CONFIG.format")
    return next(iter(deciding), "mla-ref")


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(found: list[str], known: set[str], where: str, strict: bool, fatal: bool = False) -> None:
    """Unknown keys: ConfigError when ``fatal`` (our own format) or ``strict``, else one ConfigWarning listing them all."""
    if not found:
        return
    names = [clip_text(key, 60) for key in found]
    listed = ", ".join(f"{where}{name}{_suggest(name, known)}" for name in names[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    if fatal or strict:
        others = f"; all unknown: {listed}" if len(found) > 1 else ""
        lenient = "" if fatal else "; pass strict=False (mla-ref info --no-strict) to load with a warning instead"
        raise ConfigError(f"{where}{names[0]}", f"unknown config field{_suggest(names[0], known)}{others}{lenient}", "CONFIG.format")
    warnings.warn(ConfigWarning(f"config: ignored unknown key(s) {listed} (CONFIG.format)"), stacklevel=4)


def _rope_form(where: str, node: Any, strict: bool) -> dict[str, Any]:
    """Our rope fields from one HF rope object (``rope_scaling`` or ``rope_parameters``), only those it states."""
    if node is None:
        return {"rope_scaling_type": None}
    if not isinstance(node, Mapping):
        raise ConfigError(where, f"expected an object such as {{type: yarn, factor: 40, ...}} or null, got {type(node).__name__} "
                          f"{shown(node)}", "CONFIG.rope_scaling_type")
    hf = format_specs()["hf"]
    known = set(hf["rope_keys"]) | ({"rope_theta"} if where == "rope_parameters" else set())
    _unknown_keys(sorted(str(key) for key in node if key not in known), known, f"{where}.", strict)
    kinds = {key: node[key] for key in ("type", "rope_type") if key in node}
    if len(set(map(repr, kinds.values()))) > 1:
        raise ConfigError(f"{where}.rope_type", f"{shown(kinds['rope_type'])} contradicts {where}.type = {shown(kinds['type'])}", "CONFIG.format")
    form: dict[str, Any] = {}
    if "rope_theta" in node:
        form["rope_theta"] = node["rope_theta"]
    kind = next(iter(kinds.values()), None)
    yarn_keys = [key for key in node if key in hf["rope_keys"] and key not in ("type", "rope_type")]
    if kind == "default":
        if yarn_keys:
            raise ConfigError(f"{where}.{yarn_keys[0]}", "a YaRN parameter beside rope type 'default'", "CONFIG.rope_scaling_type")
        return {**form, "rope_scaling_type": None}
    if kind is None and not yarn_keys:
        return {**form, "rope_scaling_type": None}
    if kind is None:
        raise ConfigError(f"{where}.type", f"missing beside {yarn_keys}: say type (rope_type) 'yarn'", "CONFIG.rope_scaling_type")
    if kind != "yarn":
        raise ConfigError(f"{where}.type", f"expected 'yarn' or 'default', got {shown(kind)}", "CONFIG.rope_scaling_type")
    for required in ("factor", "original_max_position_embeddings"):
        if node.get(required) is None:
            raise ConfigError(f"{where}.{required}", "required for yarn, got " + ("null" if required in node else "nothing"),
                              "CONFIG.rope_factor" if required == "factor" else "CONFIG.original_max_position_embeddings")
    if node.get("attention_factor") is not None:
        raise ConfigError(f"{where}.attention_factor", "not supported: the amplitude is derived from mscale / mscale_all_dim "
                          "(rope_amplitude)", "CONFIG.mscale")
    form["rope_scaling_type"] = "yarn"
    for field, spec in field_specs().items():
        external = str(spec.get("hf") or "")
        if external.startswith("rope_scaling.") and external.split(".", 1)[1] in node and field != "rope_scaling_type":
            form[field] = node[external.split(".", 1)[1]]
    return form


def _same(a: Any, b: Any) -> bool:
    """Equal values of one field: 40 and 40.0 agree, True and 1 do not."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _rope_key(field: str) -> str:
    """The key of a rope object that states our ``field`` (``rope_factor`` -> ``factor``)."""
    if field in ("rope_theta", "rope_scaling_type"):
        return "rope_theta" if field == "rope_theta" else "type"
    return str(field_specs()[field]["hf"]).split(".", 1)[1]


def _hf_rope(values: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    """rope_theta, rope_scaling (transformers 4) and rope_parameters (transformers 5), merged; a contradiction is an error."""
    forms = {"": {"rope_theta": values["rope_theta"]}} if "rope_theta" in values else {}
    forms.update({where: _rope_form(where, values[where], strict) for where in ("rope_scaling", "rope_parameters") if where in values})
    merged: dict[str, Any] = {}
    stated_by: dict[str, str] = {}
    for where, form in forms.items():
        for field, value in form.items():
            key = f"{where}.{_rope_key(field)}" if where else _rope_key(field)
            if field in merged and not _same(merged[field], value):
                raise ConfigError(key, f"{shown(value)} contradicts {stated_by[field]} = {shown(merged[field])}", "CONFIG.format")
            merged.setdefault(field, value)
            stated_by.setdefault(field, key)
    if "rope_interleave" in values:
        interleave = values["rope_interleave"]
        if not isinstance(interleave, bool):
            raise ConfigError("rope_interleave", f"expected bool, got {shown(interleave)} ({type(interleave).__name__})", "CONFIG.rope_layout")
        merged["rope_layout"] = "interleaved" if interleave else "half"
    return merged


def _check_fixed(values: Mapping[str, Any]) -> None:
    """HF keys whose other values describe a model mla-ref does not compute (biases, tied head, another activation)."""
    for key, expected in format_specs()["hf"]["fixed"].items():
        if key in values and values[key] is not None and not _same(values[key], expected):
            raise ConfigError(key, f"expected {expected!r} (the only value mla-ref computes), got {shown(values[key])}", "CONFIG.format")


def _check_derived(values: Mapping[str, Any], config: ModelConfig) -> None:
    """HF keys that restate derived values must agree with them."""
    expected = {"head_dim": config.qk_rope_head_dim, "qk_head_dim": config.qk_head_dim, "num_key_value_heads": config.num_attention_heads,
                "mlp_layer_types": ["sparse" if config.is_moe_layer(layer) else "dense" for layer in range(config.num_hidden_layers)]}
    if config.sparse_attention:
        expected["layer_types"] = ["indexed_attention"] * config.num_hidden_layers
    for key, value in expected.items():
        if key in values and values[key] is not None and not _same(values[key], value):
            shown_value = {"mlp_layer_types": "per first_k_dense_replace / moe_layer_freq",
                           "layer_types": "indexed_attention in every layer (index_topk is set)"}.get(key, value)
            raise ConfigError(key, f"{shown(values[key])} contradicts the config's {shown(shown_value)}", "CONFIG.format")


def from_hf(values: Mapping[str, Any], name: str = "hf-config", strict: bool = False) -> ModelConfig:
    """Read a Hugging Face ``config.json`` dict (deepseek_v2, deepseek_v3, deepseek_v32, kimi_k2; transformers 4 or 5).

    Missing fields take the defaults of the model type's transformers config class (spec/config.yaml
    ``formats.hf.model_types``), then the spec's. Unknown keys warn (error with ``strict``).
    """
    hf = format_specs()["hf"]
    _unknown_keys(sorted(str(key) for key in values if key not in _hf_top_level_keys()), _hf_top_level_keys(), "", strict)
    model_type = values.get("model_type")
    if model_type is not None and model_type not in hf["model_types"]:
        raise ConfigError("model_type", f"expected one of {sorted(hf['model_types'])}, got {shown(model_type)}", "CONFIG.format")
    not_modelled = [key for key in values if key in hf["not_modelled"]]
    if not_modelled:
        listed = "; ".join(f"{key}: {hf['not_modelled'][key]}" for key in not_modelled)
        warnings.warn(ConfigWarning(f"config: not modelled: {listed} (CONFIG.format)"), stacklevel=3)
    _check_fixed(values)
    mapped: dict[str, Any] = {"name": name, "source": "Hugging Face config.json"}
    if model_type is not None:
        mapped.update(hf["model_types"][model_type]["defaults"])
    for field, spec in field_specs().items():
        external = spec.get("hf")
        if external and "." not in str(external) and field != "rope_layout" and external in values:
            mapped[field] = values[external]
    mapped.update(_hf_rope(values, strict))
    if model_type is None and "topk_method" not in values:
        raise ConfigError("topk_method", "missing, and no model_type to take the routing default from (greedy for deepseek_v2, "
                          "noaux_tc for deepseek_v3)", "CONFIG.format")
    config = from_dict(mapped)
    _check_derived(values, config)
    return config


# OFF ModelArgs defaults for the fields its configs/*.json leave out (inference/model.py).
OFFICIAL_DEFAULTS = {"vocab_size": 102400, "rope_theta": 10000.0, "rope_factor": 40.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "max_seq_len": 16384}


def from_official(values: Mapping[str, Any], name: str = "official-config", strict: bool = False) -> ModelConfig:
    """Read a DeepSeek-V3 official ``ModelArgs`` json (configs/config_671B.json...).

    OFF has no rope type (YaRN fields always present, switched by max_seq_len), no
    amplitude factor (mscale is set equal to mscale_all_dim) and no topk_method: the
    correction bias exists in OFF only when dim == 7168 — a bug for custom configs — so
    we key it on sigmoid scoring instead and say so in spec/config.yaml.
    """
    _unknown_keys(sorted(str(key) for key in values if key not in _official_keys()), _official_keys(), "", strict)
    mapped: dict[str, Any] = {"name": name, "source": "DeepSeek-V3 official ModelArgs json", **OFFICIAL_DEFAULTS}
    for field, spec in field_specs().items():
        external = spec.get("official")
        if external and external in values:
            mapped[field] = values[external]
    mapped["mscale"] = mapped["mscale_all_dim"]
    mapped["rope_scaling_type"] = "yarn"
    mapped["yarn_activation"] = "max_seq_len"
    longest = [value for value in (mapped.get("max_seq_len"), mapped.get("original_max_position_embeddings")) if isinstance(value, int)]
    mapped.setdefault("max_position_embeddings", max(longest, default=16384))
    sigmoid = mapped.get("scoring_func", "softmax") == "sigmoid"
    groups = mapped.get("n_group", 1)
    mapped["topk_method"] = "noaux_tc" if sigmoid else ("group_limited_greedy" if isinstance(groups, int) and groups > 1 else "greedy")
    mapped["topk_norm_rule"] = "sigmoid_only"
    return from_dict(mapped)


def _from_preset_file(values: Mapping[str, Any], name: str) -> ModelConfig:
    """A preset file's mapping: ``spec_version``, ``source``, ``uncertain`` and a ``config`` of our field names."""
    _unknown_keys(sorted(str(key) for key in values if key not in PRESET_FILE_KEYS), set(PRESET_FILE_KEYS), "", True, fatal=True)
    if not isinstance(values.get("config"), Mapping):
        raise ConfigError("config", "expected a mapping of config fields", "CONFIG.presets")
    return from_dict({"name": name, "source": str(values.get("source", "")), **values["config"]})


def load_config(source: str | Path | Mapping[str, Any] | ModelConfig, *, format: str | None = None, strict: bool = False) -> ModelConfig:
    """A config from a preset name, a json/yaml path, a dict, or a config (returned as is).

    ``format`` (mla-ref, preset, hf, official) says how to read a dict or file; by default it is
    decided by a marker or the recognised key set (:func:`detect_format`), never by trial.
    ``strict``: unknown keys of HF / official files are errors instead of a ConfigWarning.
    """
    if format is not None and format not in FORMATS:
        raise ConfigError("format", f"expected one of {list(FORMATS)} or None, got {shown(format)}", "CONFIG.format")
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, Mapping):
        return _from_any_dict(source, str(source.get("name", "config")), format, strict)
    text = str(source)
    if text in preset_names():
        return load_preset(text)
    path = Path(text)
    if not path.is_file():
        raise ConfigError("preset", f"unknown preset or missing file {shown(text)}; presets: {preset_names()}", "CONFIG.presets")
    values = _read_config_file(path)
    return _from_any_dict(values, path.parent.name if path.name == "config.json" else path.stem, format, strict)


MAX_CONFIG_FILE_BYTES = 16 * 2**20  # a config.json is a few kB


def _read_config_file(path: Path) -> Mapping[str, Any]:
    """Parse a json (by suffix) or yaml config file; unreadable, oversized, non-UTF-8 or malformed is a ConfigError."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(str(path), f"{size} bytes; a config file is at most {MAX_CONFIG_FILE_BYTES}", "CONFIG")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read: {exc.strerror or exc}", "CONFIG") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start})", "CONFIG") from None
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(str(path), f"not a readable JSON config: {shown(str(exc), 200)}", "CONFIG") from None
    else:
        try:
            values = parse_yaml(text, str(path))
        except SpecError as exc:
            raise ConfigError(str(path), exc.problem, "CONFIG") from None
    if not isinstance(values, Mapping):
        raise ConfigError(str(path), f"expected a JSON/YAML object, got {type(values).__name__}", "CONFIG")
    return values


def _from_any_dict(values: Mapping[str, Any], name: str, format: str | None = None, strict: bool = False) -> ModelConfig:
    """Read a mapping in the format given or detected (spec/config.yaml ``formats``)."""
    format = format or detect_format(values)
    if format == "preset":
        return _from_preset_file(values, name)
    if format == "hf":
        return from_hf(values, name=str(values.get("_name_or_path") or name), strict=strict)
    if format == "official":
        return from_official(values, name=name, strict=strict)
    return from_dict({"name": name, **values} if "name" not in values else values)


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
