"""MOE training rules — expert load, the auxiliary-loss-free bias update and the balance losses (spec/moe.yaml MOE.14-MOE.17).

No inference path uses these. The losses are per sequence: ``scores [batch, seq,
n_routed_experts]`` and ``expert_ids [batch, seq, num_experts_per_tok]`` hold one sequence
per row, and each loss is returned per sequence (the reports do not say how to average them).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from .config import ModelConfig
from .errors import ConfigError, InputError, ShapeError, WeightError
from .checks import check_tensor
from .moe import BIAS, check_expert_ids
from .trace import Trace, emit


def expert_load(config: ModelConfig, expert_ids: npt.ArrayLike, *, trace: Trace | None = None) -> np.ndarray:
    """MOE.14 — assignments per expert over a batch of routing decisions (V3R section 2.1.2); int64 ``[n_routed_experts]``."""
    ids = check_expert_ids(config, expert_ids, ("tokens",), "MOE.14")  # [tokens, num_experts_per_tok]
    return emit(trace, "MOE.14", np.bincount(ids.reshape(-1), minlength=config.n_routed_experts))  # [n_routed_experts]


def bias_update(config: ModelConfig, bias: npt.ArrayLike, load: npt.ArrayLike, *, speed: float | None = None,
                trace: Trace | None = None) -> np.ndarray:
    """MOE.15 — ``b + gamma * sign(mean(load) - load)``: overloaded experts down, underloaded up (V3R section 2.1.2).

    Our formalisation of the report's wording; sign(0) = 0. The comparison is made as
    ``sum(load) - n_routed_experts * load`` so integer loads compare exactly. ``speed``
    overrides ``config.bias_update_speed`` (gamma).
    """
    if not config.has_correction_bias:
        raise ConfigError("topk_method", f"the bias update needs a correction bias (noaux_tc), got {config.topk_method!r}", "MOE.15")
    experts = config.n_routed_experts
    b = np.asarray(bias)
    if b.dtype.kind != "f" or b.shape != (experts,) or not np.isfinite(b).all():
        raise WeightError(BIAS, f"expected finite floats of shape [{experts}], got {b.dtype} {list(b.shape)}", "MOE.15")
    counts = np.asarray(load)
    if counts.dtype.kind not in "iuf" or counts.shape != (experts,):
        raise ShapeError("load", f"expected numbers of shape [{experts}], got {counts.dtype} {list(counts.shape)}", "MOE.15")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise InputError("load", f"expected finite values >= 0, got {counts.tolist()}", "MOE.15")
    gamma = config.bias_update_speed if speed is None else speed
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0 or not np.isfinite(gamma):
        raise InputError("speed", f"expected a finite float >= 0, got {gamma!r}", "MOE.15")
    return emit(trace, "MOE.15", b + gamma * np.sign(counts.sum() - experts * counts))  # [n_routed_experts]


@dataclasses.dataclass(frozen=True)
class SequenceBalance:
    """MOE.16: ``loss [batch]``, ``f [batch, n_routed_experts]``, ``p [batch, n_routed_experts]``."""

    loss: np.ndarray
    f: np.ndarray
    p: np.ndarray


def sequence_balance_loss(config: ModelConfig, scores: npt.ArrayLike, expert_ids: npt.ArrayLike | None = None, *, indicator: str = "unbiased_topk",
                          alpha: float | None = None, trace: Trace | None = None) -> SequenceBalance:
    """MOE.16 — the V3 complementary sequence-wise balance loss ``alpha * sum_i f_i P_i`` (V3R eqs. 17-20).

    ``scores``: the unbiased scores s of MOE.2, one sequence per row. ``indicator``:
    ``unbiased_topk`` (eq. 18 as printed: the K_r largest s over all experts, ties to the
    lower index) or ``routed`` (the routing decisions ``expert_ids``). ``alpha`` defaults to
    ``config.aux_loss_alpha``.
    """
    s = _sequence_scores(config, scores, "MOE.16")  # [batch, seq, n_routed_experts]
    if indicator == "unbiased_topk":
        if expert_ids is not None:
            raise InputError("expert_ids", "only used with indicator='routed'", "MOE.16")
        chosen = np.argsort(-s, axis=-1, kind="stable")[..., : config.num_experts_per_tok]  # [batch, seq, K]
    elif indicator == "routed":
        if expert_ids is None:
            raise InputError("expert_ids", "indicator='routed' needs the routing decisions", "MOE.16")
        chosen = check_expert_ids(config, expert_ids, ("batch", "seq"), "MOE.16")
        _same_tokens(s, chosen, "MOE.16")
    else:
        raise InputError("indicator", f"expected 'unbiased_topk' or 'routed', got {indicator!r}", "MOE.16")
    alpha = _alpha("alpha", config.aux_loss_alpha if alpha is None else alpha, "MOE.16")
    f = _selection_frequency(config, chosen)  # [batch, n_routed_experts]
    p = (s / s.sum(axis=-1, keepdims=True)).mean(axis=1)  # s' averaged over the sequence: [batch, n_routed_experts]
    loss = alpha * (f * p).sum(axis=-1)  # [batch]
    return SequenceBalance(*emit(trace, "MOE.16", loss, f, p))


@dataclasses.dataclass(frozen=True)
class V2Balance:
    """MOE.17: the three losses ``[batch]`` and the per-expert ``f``, ``p`` ``[batch, n_routed_experts]``."""

    expert_loss: np.ndarray
    device_loss: np.ndarray
    comm_loss: np.ndarray
    f: np.ndarray
    p: np.ndarray


def v2_balance_losses(config: ModelConfig, scores: npt.ArrayLike, expert_ids: npt.ArrayLike, *, devices: int | None = None,
                      max_devices: int | None = None, alpha_expert: float | None = None, alpha_device: float = 0.05,
                      alpha_comm: float = 0.02, trace: Trace | None = None) -> V2Balance:
    """MOE.17 — the DeepSeek-V2 expert-, device- and communication-level balance losses (V2R section 2.2.3).

    Devices are contiguous partitions of the experts: ``devices`` (D, default n_group) must
    divide n_routed_experts; ``max_devices`` (M, default topk_group) is the device limit of
    the communication loss. ``alpha_expert`` defaults to ``config.aux_loss_alpha``; the
    device and communication factors default to the published V2 values 0.05 and 0.02.
    """
    s = _sequence_scores(config, scores, "MOE.17")  # [batch, seq, n_routed_experts]
    chosen = check_expert_ids(config, expert_ids, ("batch", "seq"), "MOE.17")  # [batch, seq, K]
    _same_tokens(s, chosen, "MOE.17")
    experts = config.n_routed_experts
    d = config.n_group if devices is None else devices
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 or experts % d:
        raise InputError("devices", f"expected a divisor of n_routed_experts = {experts}, got {d!r}", "MOE.17")
    m = config.topk_group if max_devices is None else max_devices
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= d:
        raise InputError("max_devices", f"expected an int in 1 .. devices = {d}, got {m!r}", "MOE.17")
    alphas = [_alpha(name, value, "MOE.17") for name, value in
              (("alpha_expert", config.aux_loss_alpha if alpha_expert is None else alpha_expert),
               ("alpha_device", alpha_device), ("alpha_comm", alpha_comm))]
    batch, seq, _ = s.shape
    f = _selection_frequency(config, chosen)  # [batch, n_routed_experts]
    p = s.mean(axis=1)  # [batch, n_routed_experts]
    per_device = experts // d
    f_device = f.reshape(batch, d, per_device).mean(axis=-1)  # [batch, D]
    p_device = p.reshape(batch, d, per_device).sum(axis=-1)  # [batch, D]
    reached = np.zeros((batch, seq, d), dtype=bool)  # token t sends to device d
    np.put_along_axis(reached, chosen // per_device, True, axis=-1)
    f_comm = d / (m * seq) * reached.sum(axis=1)  # [batch, D]
    expert_loss = alphas[0] * (f * p).sum(axis=-1)  # [batch]
    device_loss = alphas[1] * (f_device * p_device).sum(axis=-1)
    comm_loss = alphas[2] * (f_comm * p_device).sum(axis=-1)
    expert_loss, device_loss, comm_loss = emit(trace, "MOE.17", expert_loss, device_loss, comm_loss)
    return V2Balance(expert_loss, device_loss, comm_loss, f, p)


def _selection_frequency(config: ModelConfig, chosen: np.ndarray) -> np.ndarray:
    """``f_i = N_r / (K_r T) * (times expert i is chosen in the sequence)``: ``[batch, n_routed_experts]``."""
    batch, seq, k = chosen.shape
    experts = config.n_routed_experts
    offsets = (np.arange(batch) * experts)[:, None, None]  # one bincount over all sequences
    hits = np.bincount((chosen + offsets).reshape(-1), minlength=batch * experts).reshape(batch, experts)
    return experts / (k * seq) * hits


def _sequence_scores(config: ModelConfig, scores, spec_id: str) -> np.ndarray:
    s = check_tensor("scores", scores, ("batch", "seq", config.n_routed_experts), spec_id, np.float64)
    if s.shape[1] == 0:
        raise InputError("scores", "expected seq >= 1 tokens per sequence, got 0", spec_id)
    return s


def _same_tokens(scores: np.ndarray, chosen: np.ndarray, spec_id: str) -> None:
    if chosen.shape[:2] != scores.shape[:2]:
        raise ShapeError("expert_ids", f"expected [batch, seq] = {list(scores.shape[:2])} like scores, got {list(chosen.shape[:2])}", spec_id)


def _alpha(name: str, value, spec_id: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise InputError(name, f"expected a finite float >= 0, got {value!r}", spec_id)
    return float(value)
