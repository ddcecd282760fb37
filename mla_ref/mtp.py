"""MTP — Multi-Token Prediction modules, their chain and losses, one function per step of spec/mtp.yaml.

:func:`mtp_module` runs one module (MTP.2-MTP.4) on given rows, with or without a cache; the
training chain and the losses are :func:`mtp_losses`; the speculative drafter that chains the
modules at the last known position is in speculative.py. Indices are 0-based: at depth k, row i
combines ``h^{k-1}_i`` with ``Emb(t_{i+k})`` and predicts ``t_{i+k+1}``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import numpy.typing as npt

from .cache import LayerCache
from .config import ModelConfig
from .errors import ConfigError, InputError
from .model import ModelResult, check_model_weights, check_tokens, cross_entropy, decoder_block, embed_tokens, \
    lm_head_logits, model_forward, model_tensor
from .norm import rms_norm
from .precision import matmul
from .trace import Trace, emit
from .weights import subtree


def mtp_layer(config: ModelConfig, depth: int) -> int:
    """The layer id of the module serving depth k: num_hidden_layers + m(k) - 1 (MTP.3, config mtp_module_reuse)."""
    return config.num_hidden_layers + config.mtp_module_of_depth(depth) - 1


def main_hidden_for_mtp(config: ModelConfig, main: ModelResult) -> np.ndarray:
    """MTP.1 — ``h^0``: the main model's last hidden state after (post_norm) or before (pre_norm) model.norm (V3R eq. 21)."""
    return main.post_norm_hidden if config.mtp_hidden_source == "post_norm" else main.pre_norm_hidden


def combine_embedding_and_hidden(config: ModelConfig, module_weights: Mapping, embedded: np.ndarray,
                                 previous_hidden: np.ndarray, trace: Trace | None = None) -> np.ndarray:
    """MTP.2 — ``h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])``, halves ordered by mtp_concat_order (V3R eq. 21)."""
    eps = config.rms_norm_eps
    embedding_half = rms_norm(embedded, model_tensor(module_weights, "enorm.weight", trace), eps)  # [batch, rows, hidden_size]
    hidden_half = rms_norm(previous_hidden, model_tensor(module_weights, "hnorm.weight", trace), eps)  # [batch, rows, hidden_size]
    halves = [embedding_half, hidden_half] if config.mtp_concat_order == "embedding_first" else [hidden_half, embedding_half]
    projection = model_tensor(module_weights, "eh_proj.weight", trace)  # [hidden_size, 2 * hidden_size]
    return matmul(np.concatenate(halves, axis=-1), projection.T)  # [batch, rows, 2 * hidden_size] -> [batch, rows, hidden_size]


def mtp_block(config: ModelConfig, weights: Mapping, depth: int, combined: np.ndarray, cache, query_lengths: np.ndarray,
              start_positions, trace: Trace | None = None):
    """MTP.3 — ``TRM_k``: the decoder block of module m(k)'s layer num_hidden_layers + m(k) - 1, causal over the rows (V3R eq. 22).

    m(k) = k, or ((k - 1) mod num_nextn_predict_layers) + 1 when mtp_module_reuse reuses modules.
    """
    layer = mtp_layer(config, depth)
    return decoder_block(config, weights, layer, combined, cache, query_lengths, start_positions, trace=trace)


def mtp_head(config: ModelConfig, module_weights: Mapping, lm_head: np.ndarray, block_output: np.ndarray,
             trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MTP.4 — ``h^k = RMSNorm(block; shared_head.norm)`` and ``P^k = OutHead(h^k)`` with the shared head (V3R eq. 23)."""
    norm = model_tensor(module_weights, "shared_head.norm.weight", trace)
    hidden = rms_norm(block_output, norm, config.rms_norm_eps)  # [batch, rows, hidden_size]
    return hidden, lm_head_logits(lm_head, hidden)  # MODEL.5: [batch, rows, vocab_size]


def mtp_depth_loss(logits: np.ndarray, tokens: np.ndarray, depth: int) -> float:
    """MTP.5 — ``L_k = -(1/T) sum_i log P^k_i[t_{i+k+1}]`` over the T - k rows, normalised by T (V3R eq. 24)."""
    seq = tokens.shape[1] - 1
    return cross_entropy(logits, tokens[:, depth + 1:], seq)  # MODEL.7


def mtp_total_loss(depth_losses: np.ndarray, mtp_lambda: float) -> float:
    """MTP.6 — ``L_MTP = lambda / D * sum_k L_k`` (V3R eq. 25)."""
    return float(mtp_lambda * np.sum(depth_losses) / len(depth_losses))


def mtp_module(config: ModelConfig, weights: Mapping[str, np.ndarray], depth: int, previous_hidden: np.ndarray, next_tokens: np.ndarray, *,
               cache: LayerCache | None = None, query_lengths: npt.ArrayLike | None = None, start_positions: npt.ArrayLike | None = None,
               trace: Trace | None = None) -> tuple[np.ndarray, np.ndarray, LayerCache]:
    """MTP.2 -> MTP.3 -> MTP.4 for module ``depth`` on rows ``previous_hidden [batch, rows, hidden_size]``.

    ``next_tokens [batch, rows]`` holds ``t_{i+k}`` of each row; ``query_lengths`` marks right
    padding; ``cache`` is the module's own layer cache (rows follow its cached rows), else the rows
    start at ``start_positions``. Returns ``h^k [batch, rows, hidden_size]``, ``logits [batch, rows,
    vocab_size]`` and the module's new cache.
    """
    lengths = np.full(next_tokens.shape[0], next_tokens.shape[1], np.int64) if query_lengths is None else query_lengths
    module_weights = subtree(weights, f"model.layers.{mtp_layer(config, depth)}.")
    embedded = embed_tokens(model_tensor(weights, "model.embed_tokens.weight", trace), next_tokens, lengths)  # MODEL.1: Emb(t_{i+k})
    combined = emit(trace, "MTP.2", combine_embedding_and_hidden(config, module_weights, embedded, previous_hidden, trace))
    block_output, cache = mtp_block(config, weights, depth, combined, cache, lengths, start_positions, trace)  # MTP.3
    block_output = emit(trace, "MTP.3", block_output)
    lm_head = model_tensor(weights, "lm_head.weight", trace)
    hidden, logits = emit(trace, "MTP.4", *mtp_head(config, module_weights, lm_head, block_output, trace))
    return hidden, logits, cache  # [batch, rows, hidden_size], [batch, rows, vocab_size]


@dataclasses.dataclass(frozen=True)
class MTPLosses:
    """Main and MTP losses of :func:`mtp_losses`; ``depth_logits[k-1]`` is ``[batch, seq - k, vocab_size]``."""

    main_loss: float  # MODEL.7
    depth_losses: np.ndarray  # [depths]: L_k (MTP.5)
    mtp_loss: float  # L_MTP (MTP.6)
    total_loss: float  # main_loss + mtp_loss
    main_logits: np.ndarray  # [batch, seq, vocab_size]
    depth_logits: tuple[np.ndarray, ...]
    depth_hidden: tuple[np.ndarray, ...]  # h^k [batch, seq - k, hidden_size]


def mtp_losses(config: ModelConfig, weights: Mapping[str, np.ndarray], tokens: npt.ArrayLike, *, depths: int | None = None, mtp_lambda: float = 0.3,
               trace: Trace | None = None) -> MTPLosses:
    """The main model and the MTP chain on ``tokens [batch, seq + 1]``: per-depth logits and losses (V3R eqs. 21-25).

    The main model reads ``tokens[:, :seq]``; depth k has the seq - k rows that have a target.
    ``depths`` defaults to config.mtp_num_depths (depth k runs module m(k), MTP.3); ``mtp_lambda`` is V3R's lambda (0.3 for the
    first 10T training tokens, then 0.1). A trace records MODEL.1-MODEL.5, MODEL.7, MTP.1, the last
    depth's MTP.2-MTP.5, and MTP.6.
    """
    depths = check_depths(config, depths)
    if isinstance(mtp_lambda, bool) or not isinstance(mtp_lambda, (int, float)) or not np.isfinite(mtp_lambda) or mtp_lambda < 0:
        raise InputError("mtp_lambda", f"expected a finite float >= 0 (V3R: 0.3, then 0.1), got {mtp_lambda!r}", "MTP.6")
    tokens, _ = check_tokens(config, tokens, None)
    seq = tokens.shape[1] - 1
    if seq <= depths:
        raise InputError("tokens", f"depth {depths} needs seq > {depths} input positions (tokens [batch, seq + 1]), "
                         f"got seq = {seq}: depth {max(seq, 0) + 1} would have no row", "MTP.2")
    check_model_weights(config, weights, mtp_module_layers(config, depths), mtp=True)
    main = model_forward(config, weights, tokens[:, :seq], trace=trace)  # MODEL.1-MODEL.5
    main_loss = float(emit(trace, "MODEL.7", np.asarray(cross_entropy(main.logits, tokens[:, 1:], seq))))
    hidden = emit(trace, "MTP.1", main_hidden_for_mtp(config, main))  # h^0 [batch, seq, hidden_size]
    depth_logits, depth_hidden, depth_losses = [], [], []
    for depth in range(1, depths + 1):
        rows = seq - depth
        start = depth if config.mtp_rope_position == "token" else 0
        hidden, logits, _ = mtp_module(config, weights, depth, hidden[:, :rows], tokens[:, depth: depth + rows],
                                       start_positions=np.full(tokens.shape[0], start), trace=trace)  # MTP.2-MTP.4
        depth_losses.append(float(emit(trace, "MTP.5", np.asarray(mtp_depth_loss(logits, tokens, depth)))))
        depth_logits.append(logits)
        depth_hidden.append(hidden)
    depth_losses = np.array(depth_losses)  # [depths]
    mtp_loss = float(emit(trace, "MTP.6", np.asarray(mtp_total_loss(depth_losses, mtp_lambda))))
    return MTPLosses(main_loss, depth_losses, mtp_loss, main_loss + mtp_loss, main.logits, tuple(depth_logits), tuple(depth_hidden))


def check_depths(config: ModelConfig, depths, drafting: bool = False) -> int:
    """The MTP depth D to use: default ``config.mtp_num_depths``; a ConfigError past the modules the reuse scheme allows.

    Without reuse D <= num_nextn_predict_layers; modulo reuse allows any D; recurrent reuse
    allows any D for drafting (MTP.7) and the one module for the training chain.
    """
    depths = config.mtp_num_depths if depths is None else depths
    modules, reuse = config.num_nextn_predict_layers, config.mtp_module_reuse
    unbounded = reuse == "modulo" or (reuse == "recurrent" and drafting)
    if isinstance(depths, bool) or not isinstance(depths, (int, np.integer)) or depths < 1 or (not unbounded and depths > modules):
        allowed = ">= 1" if unbounded else f"in 1 .. {modules} (the MTP modules of the config, mtp_module_reuse {reuse!r})"
        raise ConfigError("mtp_depths" if unbounded else "num_nextn_predict_layers", f"expected a depth {allowed}, got {depths!r}", "MTP.3")
    return int(depths)


def mtp_module_layers(config: ModelConfig, depths: int) -> list[int]:
    """The layer ids of the modules that depths 1 .. D use (each once), for the weight check."""
    return sorted({mtp_layer(config, depth) for depth in range(1, depths + 1)})
