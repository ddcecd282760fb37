"""WEIGHTS — checkpoint names and shapes, validation, and the deterministic generator.

The table of tensors lives in spec/weights.yaml. A tensor's values depend only on
(seed, name, shape), so one layer of DeepSeek-V3 can be rebuilt without the others.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from .checks import check_allocation, checked_weight
from .config import ModelConfig
from .errors import ResourceError, WeightError
from .fp8 import check_codes, weight_dequant, weight_quant
from .rope import half_layout_permutation
from .spec import evaluate_shape, load_spec_file

GENERATOR_VERSION = 1


def _condition(config: ModelConfig, when: str | None) -> bool:
    if when is None:
        return True
    if when == "no_q_lora_rank":
        return config.q_lora_rank is None
    return bool(getattr(config, when))


def _group_shapes(config: ModelConfig, group: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Names (with ``prefix``) and shapes of one group of spec/weights.yaml ``tensors``."""
    return {prefix + name: shape for name, shape in _group_table(config, group)}


@functools.lru_cache(maxsize=256)
def _group_entries(config: ModelConfig, group: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of one group for ``config``, routed-expert names kept as ``{expert}`` templates."""
    symbols = config.symbols()
    return tuple((entry["name"], evaluate_shape(entry["shape"], symbols)) for entry in load_spec_file("weights.yaml")["tensors"][group]
                 if _condition(config, entry.get("when")))


MAX_TENSORS = 10_000_000  # a name table beyond this is refused, not built (DeepSeek-V3: 91,991 tensors)


@functools.lru_cache(maxsize=256)
def _group_table(config: ModelConfig, group: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of one group for ``config``, evaluated once per config (every layer call reads it)."""
    entries = _group_entries(config, group)
    _check_tensor_count(sum(config.n_routed_experts if "{expert}" in name else 1 for name, _ in entries), f"weights.yaml {group}")
    table = []
    for name, shape in entries:
        if "{expert}" in name:
            table += [(name.format(expert=expert), shape) for expert in range(config.n_routed_experts)]
        else:
            table.append((name, shape))
    return tuple(table)


def _check_tensor_count(count: int, what: str) -> None:
    if count > MAX_TENSORS:
        raise ResourceError(what, f"{count} tensors, more than the {MAX_TENSORS} a name table is built for; "
                            "count parameters with parameter_count(config) instead", "WEIGHTS.tensors")


@functools.lru_cache(maxsize=256)
def _group_parameters(config: ModelConfig, group: str) -> tuple[int, int]:
    """(parameters without, parameters of) the routed experts in one group."""
    sizes = [(math.prod(shape), "{expert}" in name) for name, shape in _group_entries(config, group)]
    return sum(size for size, routed in sizes if not routed), config.n_routed_experts * sum(size for size, routed in sizes if routed)


def parameter_count(config: ModelConfig, layer: int | None = None) -> tuple[int, int]:
    """(parameters, of which routed experts) of decoder layer (or MTP module) ``layer``, or of the model-level tensors (None); no table is built."""
    groups = ("model",) if layer is None else ("layer", "attention", "moe_mlp" if config.is_moe_layer(layer) else "dense_mlp") + (
        ("mtp",) if layer >= config.num_hidden_layers else ())
    counted = [_group_parameters(config, group) for group in groups]
    return sum(plain + routed for plain, routed in counted), sum(routed for _, routed in counted)


def attention_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The MLA tensors relative to ``self_attn.``: ``{"q_a_proj.weight": (q_lora_rank, hidden)}``..."""
    return _group_shapes(config, "attention")


def layer_weight_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """All tensors of decoder layer (or MTP module) ``layer`` under full names."""
    prefix = f"model.layers.{layer}."
    shapes = _group_shapes(config, "layer", prefix)
    shapes.update(_group_shapes(config, "attention", prefix + "self_attn."))
    shapes.update(_group_shapes(config, "moe_mlp" if config.is_moe_layer(layer) else "dense_mlp", prefix))
    if layer >= config.num_hidden_layers:
        shapes.update(_group_shapes(config, "mtp", prefix))
    return shapes


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, MTP modules included (spec/weights.yaml ``layout``)."""
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    _check_tensor_count(layers * (config.n_routed_experts * 3 + 32), "weight_shapes")
    shapes = _group_shapes(config, "model")
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        shapes.update(layer_weight_shapes(config, layer))
    return shapes


def _init_rules() -> dict[str, str]:
    rules = {}
    for group in load_spec_file("weights.yaml")["tensors"].values():
        for entry in group:
            rules[entry["name"]] = entry["init"]
    return rules


def _init_rule(name: str, rules: Mapping[str, str]) -> str:
    """The init rule of a full or relative tensor name (longest matching suffix)."""
    parts = name.split(".")
    for start in range(len(parts)):
        suffix = ".".join(parts[start:])
        if suffix in rules:
            return rules[suffix]
        if start + 2 < len(parts) and parts[start] == "mlp" and parts[start + 1] == "experts":
            template = ".".join(["mlp", "experts", "{expert}"] + parts[start + 3:])
            if template in rules:
                return rules[template]
    raise WeightError(name, "no init rule in spec/weights.yaml for this tensor", "WEIGHTS.generator")


def tensor_seed(seed: int, name: str, shape: tuple[int, ...]) -> int:
    """The 64-bit seed of one tensor: sha256 of (generator version, seed, name, shape)."""
    key = f"mla-ref-weights/v{GENERATOR_VERSION}/{seed}/{name}/{','.join(map(str, shape))}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def generate_tensor(seed: int, name: str, shape: tuple[int, ...], rule: str, dtype=np.float64) -> np.ndarray:
    """One tensor by its init rule (spec/weights.yaml ``generator.init``), read-only (copy it to edit it)."""
    check_allocation(name, shape, np.float64, "WEIGHTS.generator")
    z = np.random.Generator(np.random.PCG64(tensor_seed(seed, name, shape))).standard_normal(shape)
    if rule == "linear":
        values = np.divide(z, np.sqrt(shape[-1]), out=z)
    elif rule == "norm":
        values = 1.0 + 0.1 * z
    elif rule == "embedding":
        values = z
    elif rule == "bias":
        values = 0.1 * z
    else:
        raise WeightError(name, f"unknown init rule {rule!r}", "WEIGHTS.generator")
    values = values.astype(dtype, copy=False)
    values.setflags(write=False)  # a generated tensor never changes: its checks are remembered (checks.checked_weight)
    return values


def generate_weights(config: ModelConfig, seed: int = 0, names: Iterable[str] | None = None,
                     shapes: Mapping[str, tuple[int, ...]] | None = None, dtype: npt.DTypeLike = np.float64,
                     fp8: bool = False) -> dict[str, np.ndarray]:
    """Deterministic weights under Hugging Face names.

    ``shapes`` defaults to the whole model (:func:`weight_shapes`); pass
    ``attention_weight_shapes(config)`` for one MLA layer's relative names, or ``names``
    to build a subset (e.g. only the experts some tokens need). ``fp8``: the linear layers
    as an FP8 checkpoint, uint8 e4m3fn codes plus ``{name}_scale_inv`` (spec/fp8.yaml checkpoint).
    """
    table = dict(weight_shapes(config) if shapes is None else shapes)
    if names is not None:
        wanted = list(names)
        missing = [name for name in wanted if name not in table]
        if missing:
            raise WeightError(missing[0], f"not a tensor of this config ({len(missing)} unknown)", "WEIGHTS.tensors")
        table = {name: table[name] for name in wanted}
    rules = _init_rules()
    weights = {}
    for name, shape in table.items():
        rule = _init_rule(name, rules)
        if fp8 and rule == "linear" and not _matches(name, _fp8_checkpoint()["kept"]):
            weights[name], weights[name + "_scale_inv"] = quantize_checkpoint_tensor(name, generate_tensor(seed, name, shape, rule))
        else:
            weights[name] = generate_tensor(seed, name, shape, rule, dtype)
    return weights


def quantize_checkpoint_tensor(name: str, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FP8.5 as the FP8 checkpoint applies it to tensor ``name`` (spec/fp8.yaml checkpoint): codes and weight_scale_inv,
    amax / 448 scales for the names of ``amax_scales``, ue8m0 for the others; read-only."""
    scale_fmt = None if _matches(name, _fp8_checkpoint()["amax_scales"]) else "ue8m0"
    return _read_only(*weight_quant(value, scale_fmt))


def _fp8_checkpoint() -> dict:
    return load_spec_file("fp8.yaml")["checkpoint"]


def _matches(name: str, entries: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``entries`` or ends in ``"." + entry``."""
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.setflags(write=False)
    return arrays


def dequantize_checkpoint(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FP8.4 on every ``{name}`` / ``{name}_scale_inv`` pair of an FP8 checkpoint: float64 weights, scales dropped.

    A uint8 tensor without its scale, or a scale without its tensor, raises ``WeightError``: raw codes are never
    read as values (``fp8_cast_bf16.py`` copies them with only a warning).
    """
    dequantized = {}
    for name, value in weights.items():
        if name.endswith("_scale_inv"):
            if name[: -len("_scale_inv")] not in weights:
                raise WeightError(name, f"a scale without its tensor {name[: -len('_scale_inv')]!r}", "FP8.4")
            continue
        if np.asarray(value).dtype == np.uint8 or name + "_scale_inv" in weights:
            if name + "_scale_inv" not in weights:
                raise WeightError(name, f"uint8 fp8 codes without {name + '_scale_inv'!r}", "FP8.4")
            value = weight_dequant(check_codes(value, name, "FP8.4"), weights[name + "_scale_inv"])
            value.setflags(write=False)
        dequantized[name] = value
    return dequantized


def fp8_tensors(weights) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FP8.13 — ``{name: (codes, weight_scale_inv)}`` for every tensor of ``weights`` that has a ``{name}_scale_inv``
    (empty for a checkpoint without FP8 tensors, or for anything that is not a mapping)."""
    if not isinstance(weights, Mapping):
        return {}
    suffix = "_scale_inv"
    return {name[: -len(suffix)]: (weights[name[: -len(suffix)]], weights[name]) for name in map(str, weights)
            if name.endswith(suffix) and name[: -len(suffix)] in weights}


def generate_attention_weights(config: ModelConfig, seed: int = 0, layer: int = 0, dtype: npt.DTypeLike = np.float64,
                               fp8: bool = False) -> dict[str, np.ndarray]:
    """The MLA tensors of ``layer`` under relative names (values equal to the full model's)."""
    prefix = f"model.layers.{layer}.self_attn."
    full = generate_weights(config, seed, shapes={prefix + name: shape for name, shape in attention_weight_shapes(config).items()},
                            dtype=dtype, fp8=fp8)
    return {name[len(prefix):]: value for name, value in full.items()}


def subtree(weights: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The tensors under ``prefix`` with the prefix removed (``model.layers.0.self_attn.``)."""
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def check_weights(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray],
                  spec_id: str, dtype=np.float64) -> dict[str, np.ndarray]:
    """Validate names, shapes and dtypes; return the tensors cast to ``dtype``.

    Missing, extra (unexpected) and mis-shaped tensors, non-float dtypes and NaN / inf
    values raise ``WeightError`` naming the tensor.
    """
    if not isinstance(weights, Mapping):
        raise WeightError("weights", f"expected a mapping name -> array, got {type(weights).__name__}", spec_id)
    missing = [name for name in expected if name not in weights]
    if missing:
        raise WeightError(missing[0], f"missing (expected shape {list(expected[missing[0]])}); all missing: {missing}", spec_id)
    fp8_hint = "; an FP8 checkpoint is read through mla_ref.weights.dequantize_checkpoint (FP8.4)"
    extra = sorted(set(weights) - set(expected))
    if extra:
        hint = fp8_hint if extra[0].endswith("_scale_inv") else ""
        raise WeightError(extra[0], f"unexpected tensor; expected only {sorted(expected)}{hint}", spec_id)
    checked = {}
    for name, shape in expected.items():
        value = np.asarray(weights[name])
        if value.dtype.kind != "f":
            hint = fp8_hint if value.dtype == np.uint8 else ""
            raise WeightError(name, f"expected a real floating dtype, got {value.dtype}{hint}", spec_id)
        if value.shape != tuple(shape):
            raise WeightError(name, f"expected shape {list(shape)}, got {list(value.shape)}", spec_id)
        checked[name] = checked_weight(name, value, dtype, spec_id)
    return checked


def attention_weights_for_half_layout(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ROPE.7 — permute the rope rows so that ``rope_layout = half`` reproduces the canonical model.

    Rows permuted: the last ``qk_rope_head_dim`` rows of every head block of q_b_proj /
    q_proj, and the last ``qk_rope_head_dim`` rows of kv_a_proj_with_mqa.
    """
    permutation = half_layout_permutation(config.qk_rope_head_dim)
    q_name = "q_b_proj.weight" if config.q_lora_rank else "q_proj.weight"
    permuted = dict(weights)
    q_weight = np.asarray(weights[q_name]).reshape(config.num_attention_heads, config.qk_head_dim, -1)
    rows = np.concatenate([np.arange(config.qk_nope_head_dim), config.qk_nope_head_dim + permutation])
    permuted[q_name] = q_weight[:, rows, :].reshape(weights[q_name].shape)
    kv_rows = np.concatenate([np.arange(config.kv_lora_rank), config.kv_lora_rank + permutation])
    permuted["kv_a_proj_with_mqa.weight"] = np.asarray(weights["kv_a_proj_with_mqa.weight"])[kv_rows]
    return permuted
