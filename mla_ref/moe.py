"""MOE — DeepSeek-MoE routing, experts and the feed-forward block, one function per step of spec/moe.yaml.

:func:`route` runs the router (MOE.1-MOE.8) on a batch of tokens; :func:`ffn_forward` runs
the feed-forward block of one layer: the MoE layer (MOE.1-MOE.12) or, where
``config.is_moe_layer(layer)`` is false, the dense MLP (MOE.13). The training-side rules
are in balance.py, the expert-parallel dispatch plan in dispatch.py. ``tokens`` is the
flattened token axis; the other shape names are config fields.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping

import numpy as np
import numpy.typing as npt

from .config import ModelConfig
from .errors import InputError, NumericError, ShapeError, WeightError
from .checks import all_finite, check_tensor, checked_weight, compute_dtype, finite_output, first_nonfinite
from .fp8 import check_codes, linear, weight_dequant
from .precision import exp, matmul
from .spec import evaluate_shape, load_spec_file
from .trace import Trace, emit

GATE = "mlp.gate.weight"
BIAS = "mlp.gate.e_score_correction_bias"
_EXPERT_NAME = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ------------------------------------------------------------------ router: MOE.1-MOE.8

def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-z))``, without overflow for large ``|z|``."""
    e = exp(-np.abs(z))
    with np.errstate(invalid="ignore"):  # NaN logits stay NaN (rejected upstream unless allowed)
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def gate_logits(hidden: np.ndarray, gate_weight: np.ndarray) -> np.ndarray:
    """MOE.1 — router logits ``hidden @ W_gate.T`` (V3R eq. 15, u_t^T e_i)."""
    return matmul(hidden, gate_weight.T)  # [tokens, n_routed_experts]


def gate_scores(config: ModelConfig, logits: np.ndarray) -> np.ndarray:
    """MOE.2 — scores: softmax over all experts (V2R section 2.2.1) or elementwise sigmoid (V3R eq. 15)."""
    if config.scoring_func == "sigmoid":
        return sigmoid(logits)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits give non-finite scores, reported by the caller
        exponentials = exp(logits - logits.max(axis=-1, keepdims=True))
        return exponentials / exponentials.sum(axis=-1, keepdims=True)  # [tokens, n_routed_experts]


def selection_scores(scores: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """MOE.3 — ``scores + b``, used only to choose experts (V3R eq. 16); without a bias the scores."""
    return scores if bias is None else scores + bias  # [tokens, n_routed_experts]


def group_scores(config: ModelConfig, selection: np.ndarray) -> np.ndarray:
    """MOE.4 — one score per contiguous expert group: the max (V2) or the sum of the top two (V3) (V3R section 2.1.2)."""
    grouped = selection.reshape(selection.shape[0], config.n_group, config.n_routed_experts // config.n_group)
    if config.group_rule == "max":
        return grouped.max(axis=-1)  # [tokens, n_group]
    best_two = np.sort(grouped, axis=-1)[..., ::-1][..., :2]  # [tokens, n_group, min(2, experts_per_group)]
    return best_two.sum(axis=-1)  # [tokens, n_group]


def group_selection(config: ModelConfig, scores_of_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MOE.5 — keep the topk_group best groups, ties to the lower group index, and the group margin (V2R section 2.2.2)."""
    kept_count = config.topk_group
    order = np.argsort(-scores_of_groups, axis=-1, kind="stable")  # [tokens, n_group]: best first
    kept_groups = order[:, :kept_count]  # [tokens, topk_group]
    if kept_count == config.n_group:
        return kept_groups, np.full(order.shape[0], np.inf, dtype=scores_of_groups.dtype)
    last_kept = np.take_along_axis(scores_of_groups, order[:, kept_count - 1: kept_count], axis=-1)[:, 0]
    best_dropped = np.take_along_axis(scores_of_groups, order[:, kept_count: kept_count + 1], axis=-1)[:, 0]
    return kept_groups, last_kept - best_dropped  # [tokens]


def group_mask(config: ModelConfig, selection: np.ndarray, kept_groups: np.ndarray) -> np.ndarray:
    """MOE.6 — experts of dropped groups get -inf, or 0.0 with group_mask_fill 'zero' (V2R section 2.2.2; OFF Gate.forward)."""
    kept = np.zeros((selection.shape[0], config.n_group), dtype=bool)  # [tokens, n_group]
    np.put_along_axis(kept, kept_groups, True, axis=-1)
    kept_experts = np.repeat(kept, config.n_routed_experts // config.n_group, axis=-1)  # [tokens, n_routed_experts]
    fill = -np.inf if config.group_mask_fill == "-inf" else 0.0
    return np.where(kept_experts, selection, fill)


def expert_selection(config: ModelConfig, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MOE.7 — the top num_experts_per_tok experts, descending, ties to the lower index, and the expert margin (V3R eq. 16)."""
    k = config.num_experts_per_tok
    order = np.argsort(-masked, axis=-1, kind="stable")  # [tokens, n_routed_experts]: best first
    expert_ids = order[:, :k]  # [tokens, num_experts_per_tok]
    if k == masked.shape[-1]:
        return expert_ids, np.full(masked.shape[0], np.inf, dtype=masked.dtype)
    kth = np.take_along_axis(masked, order[:, k - 1: k], axis=-1)[:, 0]
    next_best = np.take_along_axis(masked, order[:, k: k + 1], axis=-1)[:, 0]
    with np.errstate(invalid="ignore"):  # -inf - -inf: no finite K-th candidate either
        return expert_ids, kth - next_best  # [tokens]; +inf when the (K+1)-th is a -inf fill


def renormalises_topk(config: ModelConfig) -> bool:
    """Whether MOE.8 renormalises the chosen weights: per norm_topk_prob, or iff sigmoid scoring (topk_norm_rule)."""
    if config.topk_norm_rule == "sigmoid_only":
        return config.scoring_func == "sigmoid"
    return config.norm_topk_prob


def routing_weights(config: ModelConfig, scores: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
    """MOE.8 — unbiased scores of the chosen experts, optionally renormalised, times routed_scaling_factor (V3R eq. 13, 16)."""
    chosen = np.take_along_axis(scores, expert_ids, axis=-1)  # [tokens, num_experts_per_tok]
    if renormalises_topk(config):
        total = chosen.sum(axis=-1, keepdims=True) + config.topk_norm_epsilon  # [tokens, 1]
        zero = (total[:, 0] == 0) & np.isfinite(chosen).all(axis=-1)
        if zero.any():
            token = int(np.argmax(zero))
            raise NumericError("weights", f"token {token}: every chosen score is 0 (underflow: sigmoid of logits below about -745 in "
                               "float64, -104 in float32), so renormalising is 0/0. The spec divides as is (OFF, vLLM); HF3 adds "
                               "1e-20 to the denominator and gets weights 0: set topk_norm_epsilon = 1e-20 for that", "MOE.8")
        chosen = chosen / total
    return chosen * config.routed_scaling_factor


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's intermediates and decision for each token (MOE.1-MOE.8), in the shapes of spec/moe.yaml."""

    logits: np.ndarray  # [tokens, n_routed_experts]
    scores: np.ndarray  # [tokens, n_routed_experts]
    selection: np.ndarray  # [tokens, n_routed_experts]
    group_scores: np.ndarray  # [tokens, n_group]
    kept_groups: np.ndarray  # [tokens, topk_group]
    group_margin: np.ndarray  # [tokens]
    masked: np.ndarray  # [tokens, n_routed_experts]
    expert_ids: np.ndarray  # [tokens, num_experts_per_tok]
    expert_margin: np.ndarray  # [tokens]
    weights: np.ndarray  # [tokens, num_experts_per_tok]


def route(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: npt.ArrayLike, *, dtype: npt.DTypeLike = np.float64,
          allow_nonfinite: bool = False, forced_expert_ids: npt.ArrayLike | None = None, trace: Trace | None = None) -> Routing:
    """MOE.1-MOE.8 — route ``hidden [..., hidden_size]`` (leading axes flattened into tokens).

    ``weights`` holds ``mlp.gate.weight`` and, iff the config has a correction bias,
    ``mlp.gate.e_score_correction_bias`` (names relative to ``model.layers.{layer}.``; other
    tensors are ignored).
    """
    dtype = compute_dtype(dtype, "MOE.1")
    x = _flat_hidden(config, hidden, dtype, allow_nonfinite)  # [tokens, hidden_size]
    x = x if trace is None else trace.round_input(x)
    gate, bias = _router_tensors(config, weights, dtype, trace)
    return _route_tokens(config, gate, bias, x, allow_nonfinite, trace, forced_expert_ids)


def _route_tokens(config, gate, bias, x, allow_nonfinite, trace, forced_expert_ids=None) -> Routing:
    logits = emit(trace, "MOE.1", gate_logits(x, gate))  # [tokens, n_routed_experts]
    scores = emit(trace, "MOE.2", gate_scores(config, logits))
    if not allow_nonfinite and not np.isfinite(scores).all():
        token, expert = (int(i) for i in np.argwhere(~np.isfinite(scores))[0])
        raise InputError("scores", f"{scores[token, expert]} at token {token}, expert {expert} (logit {logits[token, expert]}); "
                         "pass allow_nonfinite=True to accept non-finite rows", "MOE.2")
    selection = emit(trace, "MOE.3", selection_scores(scores, bias))
    scores_of_groups = emit(trace, "MOE.4", group_scores(config, selection))  # [tokens, n_group]
    kept_groups, group_margin = emit(trace, "MOE.5", *group_selection(config, scores_of_groups))  # [tokens, topk_group], [tokens]
    masked = emit(trace, "MOE.6", group_mask(config, selection, kept_groups))  # [tokens, n_routed_experts]
    expert_ids, expert_margin = expert_selection(config, masked)  # [tokens, num_experts_per_tok], [tokens]
    if forced_expert_ids is not None:  # teacher forcing: another implementation's (acceptable) choice
        expert_ids = check_expert_ids(config, forced_expert_ids, ("tokens",), "MOE.7")
        if expert_ids.shape[0] != x.shape[0]:
            raise ShapeError("forced_expert_ids", f"expected [{x.shape[0]}, {config.num_experts_per_tok}], got {list(expert_ids.shape)}", "MOE.7")
    expert_ids, expert_margin = emit(trace, "MOE.7", expert_ids, expert_margin)
    weights = emit(trace, "MOE.8", routing_weights(config, scores, expert_ids))  # [tokens, num_experts_per_tok]
    return Routing(logits, scores, selection, scores_of_groups, kept_groups, group_margin, masked,
                   expert_ids, expert_margin, weights)


# ------------------------------------------------------------------ experts: MOE.9-MOE.13

def swiglu(x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray) -> np.ndarray:
    """SwiGLU MLP ``(silu(x @ gate.T) * (x @ up.T)) @ down.T`` of MOE.9, MOE.11 and MOE.13 (OFF Expert, MLP); FP8 weights
    of the fp8 profile's emulation through FP8.8 (FP8.13)."""
    gate = linear(x, gate_proj)  # [rows, inner]
    return linear(gate * sigmoid(gate) * linear(x, up_proj), down_proj)  # [rows, hidden_size]


def assignment_order(expert_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (token, slot) assignment sorted by expert id, then token, then slot: ``tokens, slots, experts``, each ``[tokens * K]``."""
    flat = expert_ids.reshape(-1)  # position token * K + slot
    order = np.argsort(flat, kind="stable")
    return order // expert_ids.shape[1], order % expert_ids.shape[1], flat[order]


def expert_outputs(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: np.ndarray, expert_ids: np.ndarray,
                   dtype=np.float64, trace: Trace | None = None) -> np.ndarray:
    """MOE.9 — each routed expert's SwiGLU on its tokens, one row per assignment in dispatch order (V3R eq. 12).

    Only the experts that received a token are read from ``weights``, one expert at a time.
    """
    tokens, _, experts = assignment_order(expert_ids)  # [tokens * K] each
    expert_out = np.empty((tokens.size, hidden.shape[-1]), dtype=hidden.dtype)  # [tokens * K, hidden_size]
    used, starts, counts = np.unique(experts, return_index=True, return_counts=True)
    templates = _spec_shapes(config, "moe_mlp", experts=True)
    for expert, start, count in zip(used.tolist(), starts.tolist(), counts.tolist()):
        rows = slice(start, start + count)
        hint = f"; token {int(tokens[start])} is routed to expert {expert}: build the needed experts with needed_expert_weight_names"
        projections = [_tensor(weights, name.format(expert=expert), shape, "MOE.9", dtype, trace, hint) for name, shape in templates.items()]
        expert_out[rows] = swiglu(hidden[tokens[rows]], *projections)
    return expert_out


def combine_experts(expert_out: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """MOE.10 — ``routed[t] = sum_k w[t, k] * E_k(x[t])``, accumulated in increasing expert id (V3R eq. 12)."""
    tokens, slots, _ = assignment_order(expert_ids)
    row_of = np.empty(expert_ids.size, np.int64)
    row_of[tokens * expert_ids.shape[1] + slots] = np.arange(expert_ids.size)
    row_of = row_of.reshape(expert_ids.shape)  # [tokens, K]: the expert_out row of each (token, slot)
    every_token = np.arange(expert_ids.shape[0])
    routed = np.zeros((expert_ids.shape[0], expert_out.shape[-1]), dtype=expert_out.dtype)  # [tokens, hidden_size]
    for slot in np.argsort(expert_ids, axis=1, kind="stable").T:  # [tokens]: each token's slot of its next larger expert id
        routed += weights[every_token, slot][:, None] * expert_out[row_of[every_token, slot]]
    return routed


def shared_experts(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: np.ndarray, dtype=np.float64,
                   trace: Trace | None = None) -> np.ndarray:
    """MOE.11 — the shared experts: one SwiGLU of width n_shared_experts * moe_intermediate_size on every token (V3R eq. 12)."""
    shapes = {name: shape for name, shape in _spec_shapes(config, "moe_mlp").items() if name.startswith("mlp.shared_experts.")}
    return swiglu(hidden, *(_tensor(weights, name, shape, "MOE.11", dtype, trace) for name, shape in shapes.items()))


def moe_output(routed: np.ndarray, shared: np.ndarray | None) -> np.ndarray:
    """MOE.12 — ``routed + shared``, the shared experts unweighted (V3R eq. 12, without the residual)."""
    return routed if shared is None else routed + shared  # [tokens, hidden_size]


def dense_mlp(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: np.ndarray, dtype=np.float64,
              trace: Trace | None = None) -> np.ndarray:
    """MOE.13 — the dense SwiGLU MLP of width intermediate_size, for layers that are not MoE (V3R section 4.2)."""
    shapes = _spec_shapes(config, "dense_mlp")
    return swiglu(hidden, *(_tensor(weights, name, shape, "MOE.13", dtype, trace) for name, shape in shapes.items()))


@dataclasses.dataclass(frozen=True)
class FFNResult:
    """``output`` with the shape of the hidden input; ``routing`` (None for a dense layer)."""

    output: np.ndarray
    routing: Routing | None


def ffn_forward(config: ModelConfig, weights: Mapping[str, np.ndarray], hidden: npt.ArrayLike, layer: int, *, dtype: npt.DTypeLike = np.float64,
                allow_nonfinite: bool = False, forced_expert_ids: npt.ArrayLike | None = None, trace: Trace | None = None) -> FFNResult:
    """The feed-forward block of ``layer``: MoE (MOE.1-MOE.12) or dense (MOE.13) per ``config.is_moe_layer``.

    ``weights``: the layer's tensors relative to ``model.layers.{layer}.`` (only ``mlp.`` names
    are read; any Mapping works). For an MoE layer only the routed experts the tokens need
    must be present (see :func:`needed_expert_weight_names`). ``hidden [..., hidden_size]``.
    ``forced_expert_ids [tokens, num_experts_per_tok]`` replaces the router's choice (teacher
    forcing: the downstream output under another implementation's routing).
    """
    dtype = compute_dtype(dtype, "MOE.1")
    _check_layer(config, layer)
    x = _flat_hidden(config, hidden, dtype, allow_nonfinite)  # [tokens, hidden_size]
    x = x if trace is None else trace.round_input(x)
    _reject_unexpected(config, weights, layer)
    leading = np.shape(hidden)[:-1]
    if not config.is_moe_layer(layer):
        output = emit(trace, "MOE.13", dense_mlp(config, weights, x, dtype, trace))  # [tokens, hidden_size]
        output = output if allow_nonfinite else finite_output("output", output, "MOE.13")
        return FFNResult(output.reshape(leading + (config.hidden_size,)), None)
    gate, bias = _router_tensors(config, weights, dtype, trace)
    routing = _route_tokens(config, gate, bias, x, allow_nonfinite, trace, forced_expert_ids)  # MOE.1-MOE.8
    expert_out = emit(trace, "MOE.9", expert_outputs(config, weights, x, routing.expert_ids, dtype, trace))  # [tokens * K, hidden]
    routed = emit(trace, "MOE.10", combine_experts(expert_out, routing.expert_ids, routing.weights))  # [tokens, hidden_size]
    shared = emit(trace, "MOE.11", shared_experts(config, weights, x, dtype, trace)) if config.n_shared_experts else None
    output = emit(trace, "MOE.12", moe_output(routed, shared))  # [tokens, hidden_size]
    output = output if allow_nonfinite else finite_output("output", output, "MOE.12")
    return FFNResult(output.reshape(leading + (config.hidden_size,)), routing)


# ------------------------------------------------------------------ weight names

def needed_expert_weight_names(config: ModelConfig, layer: int, expert_ids: npt.ArrayLike) -> list[str]:
    """Full names ``model.layers.{layer}.mlp.experts.{e}.*`` of the experts in ``expert_ids``, by expert id.

    Route first, then ``generate_weights(config, seed, names=..., shapes=layer_weight_shapes(config, layer))``
    builds only these (spec/moe.yaml conventions.needed_experts).
    """
    _check_moe_layer(config, layer)
    ids = np.asarray(expert_ids)
    if ids.size and ids.dtype.kind not in "iu":
        raise ShapeError("expert_ids", f"expected integers, got {ids.dtype}", "MOE.9")
    if ids.size and (ids.min() < 0 or ids.max() >= config.n_routed_experts):
        raise InputError("expert_ids", f"expected ids in 0 .. {config.n_routed_experts - 1}, got {ids.min()} .. {ids.max()}", "MOE.9")
    templates = _spec_shapes(config, "moe_mlp", experts=True)
    return [f"model.layers.{layer}." + name.format(expert=expert) for expert in np.unique(ids).astype(np.int64).tolist() for name in templates]


def moe_weight_names(config: ModelConfig, layer: int, expert_ids=None) -> list[str]:
    """Full names of the gate, the bias (if any), the shared experts (if any), then the routed experts ``expert_ids`` need (all if None)."""
    _check_moe_layer(config, layer)
    prefix = f"model.layers.{layer}."
    names = [prefix + name for name in _spec_shapes(config, "moe_mlp")]
    every_expert = np.arange(config.n_routed_experts) if expert_ids is None else expert_ids
    return names + needed_expert_weight_names(config, layer, every_expert)


# ------------------------------------------------------------------ validation helpers

def check_expert_ids(config: ModelConfig, expert_ids, leading: tuple[str, ...], spec_id: str) -> np.ndarray:
    """Integer ids of shape ``[*leading, num_experts_per_tok]`` in 0 .. n_routed_experts - 1, no expert twice per token."""
    ids = np.asarray(expert_ids)
    k = config.num_experts_per_tok
    if ids.dtype.kind not in "iu" or ids.ndim != len(leading) + 1 or ids.shape[-1] != k:
        raise ShapeError("expert_ids", f"expected integers of shape [{', '.join(leading + (str(k),))}], got {ids.dtype} {list(ids.shape)}", spec_id)
    if ids.size and (ids.min() < 0 or ids.max() >= config.n_routed_experts):
        bad = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= config.n_routed_experts))[0])
        raise InputError("expert_ids", f"expected ids in 0 .. {config.n_routed_experts - 1}, got {ids[bad]} at index {bad}", spec_id)
    ordered = np.sort(ids, axis=-1)
    repeated = ordered[..., 1:] == ordered[..., :-1]
    if repeated.any():
        where = tuple(int(i) for i in np.argwhere(repeated)[0])
        raise InputError("expert_ids", f"token {where[:-1]} chooses expert {ordered[where]} twice", spec_id)
    return ids.astype(np.int64)


def _spec_shapes(config: ModelConfig, group: str, experts: bool = False) -> dict[str, tuple[int, ...]]:
    """Relative names and shapes of a spec/weights.yaml group that exist for ``config``.

    ``experts``: only the ``{expert}`` templates (unformatted); otherwise everything else.
    """
    return dict(_spec_table(config, group, experts))


@functools.lru_cache(maxsize=256)
def _spec_table(config: ModelConfig, group: str, experts: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) pairs of :func:`_spec_shapes`, evaluated once per config (every layer call reads them)."""
    symbols = config.symbols()
    table = []
    for entry in load_spec_file("weights.yaml")["tensors"][group]:
        when = entry.get("when")
        if ("{expert}" in entry["name"]) != experts or (when is not None and not getattr(config, when)):
            continue
        table.append((entry["name"], evaluate_shape(entry["shape"], symbols)))
    return tuple(table)


def _tensor(weights: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], spec_id: str, dtype,
            trace: Trace | None = None, hint: str = "") -> np.ndarray:
    """Read one tensor, check its dtype and shape, cast it to ``dtype`` (and hold it as the trace's profile holds weights).

    A tensor with a ``{name}_scale_inv`` is FP8 (uint8 codes of an FP8 checkpoint): dequantised by FP8.4, kept FP8
    under a profile with ``fp8_linear`` (FP8.13).
    """
    if name not in weights:
        raise WeightError(name, f"missing (expected shape {list(shape)}){hint}", spec_id)
    value = np.asarray(weights[name])
    fp8 = None
    if name + "_scale_inv" in weights:
        fp8 = (check_codes(value, name, "FP8.4"), weights[name + "_scale_inv"])
        value = weight_dequant(*fp8)
    if value.dtype.kind != "f":
        raise WeightError(name, f"expected a real floating dtype, got {value.dtype}", spec_id)
    if value.shape != tuple(shape):
        raise WeightError(name, f"expected shape {list(shape)}, got {list(value.shape)}", spec_id)
    value = checked_weight(name, value, dtype, spec_id)
    return value if trace is None else trace.weight(value, fp8)


def _router_tensors(config: ModelConfig, weights: Mapping[str, np.ndarray], dtype,
                    trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The gate weight and the correction bias (None without noaux_tc), checked and finite."""
    if not isinstance(weights, Mapping):
        raise WeightError("weights", f"expected a mapping name -> array, got {type(weights).__name__}", "MOE.1")
    shapes = _spec_shapes(config, "moe_mlp")
    gate = _tensor(weights, GATE, shapes[GATE], "MOE.1", dtype, trace)
    bias = None
    if config.has_correction_bias:
        bias = _tensor(weights, BIAS, shapes[BIAS], "MOE.3", dtype)  # kept in fp32 or better (OFF 4592be48)
    elif BIAS in weights:
        raise WeightError(BIAS, f"unexpected: the config has no correction bias (topk_method = {config.topk_method!r}, not 'noaux_tc')", "MOE.3")
    for name, value, spec_id in ((GATE, gate, "MOE.1"), (BIAS, bias, "MOE.3")):
        if value is not None and not all_finite(value):
            index = first_nonfinite(value)
            raise WeightError(name, f"contains {value[index]} at index {index}; expected finite values", spec_id)
    return gate, bias


def _reject_unexpected(config: ModelConfig, weights: Mapping[str, np.ndarray], layer: int) -> None:
    """An ``mlp.`` name the layer does not have (wrong kind of layer, bias without noaux_tc, expert id out of range)."""
    if not isinstance(weights, Mapping):
        raise WeightError("weights", f"expected a mapping name -> array, got {type(weights).__name__}", "MOE.1")
    moe = config.is_moe_layer(layer)
    allowed = set(_spec_shapes(config, "moe_mlp" if moe else "dense_mlp"))
    for name in map(str, weights):
        name = name.removesuffix("_scale_inv")  # an FP8 tensor's scale goes with its tensor (FP8.4)
        if not name.startswith("mlp.") or name in allowed:
            continue
        match = _EXPERT_NAME.match(name)
        if moe and match and int(match.group(1)) < config.n_routed_experts:
            continue
        if not moe:
            problem, spec_id = f"unexpected: layer {layer} is dense (is_moe_layer is false), expected only {sorted(allowed)}", "MOE.13"
        elif name == BIAS:
            problem, spec_id = f"unexpected: the config has no correction bias (topk_method = {config.topk_method!r}, not 'noaux_tc')", "MOE.3"
        else:
            problem, spec_id = (f"unexpected for MoE layer {layer}: expected only {sorted(allowed)} and "
                                f"mlp.experts.{{0..{config.n_routed_experts - 1}}}.{{gate,up,down}}_proj.weight"), "MOE.9"
        raise WeightError(name, problem, spec_id)


def _check_layer(config: ModelConfig, layer) -> None:
    total = config.num_hidden_layers + config.num_nextn_predict_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < total:
        raise InputError("layer", f"expected an int in 0 .. {total - 1} (layers and MTP modules), got {layer!r}", "MOE.13")


def _check_moe_layer(config: ModelConfig, layer) -> None:
    _check_layer(config, layer)
    if not config.is_moe_layer(layer):
        raise InputError("layer", f"layer {layer} is dense (first_k_dense_replace = {config.first_k_dense_replace}, "
                         f"moe_layer_freq = {config.moe_layer_freq}): it has no experts", "MOE.13")


def _flat_hidden(config: ModelConfig, hidden, dtype, allow_nonfinite: bool) -> np.ndarray:
    """``hidden [..., hidden_size]`` flattened to ``[tokens, hidden_size]``, checked and cast."""
    array = np.asarray(hidden)
    if array.ndim < 1 or array.shape[-1] != config.hidden_size:
        raise ShapeError("hidden", f"expected [..., {config.hidden_size}] (tokens, hidden_size), got {tuple(array.shape)}", "MOE.1")
    return check_tensor("hidden", array.reshape(-1, config.hidden_size), ("tokens", config.hidden_size), "MOE.1", dtype, allow_nonfinite)
