"""MODEL — the decoder stack, one function per step of spec/model.yaml.

:func:`model_forward` runs the embedding, ``num_hidden_layers`` pre-norm blocks, the final norm
and the untied head on new tokens: prefill, prefill after a cached prefix, cached decode, or a
multi-token verification step. Ragged batches are right-padded and described by
``query_lengths``. :func:`greedy_generate` prefills ragged prompts and decodes greedily with the
cache. Shapes use the config's names; ``batch`` and ``seq`` (new tokens) are runtime sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .cache import Fp8LatentCache, LatentCache, LayerCache, NaiveCache, PagedLatentCache
from .dsa import SparseCache
from .checks import checked_weight, finite_output
from .config import ModelConfig
from .errors import CacheError, InputError, ShapeError, WeightError
from .mla import mla_forward
from .moe import ffn_forward
from .norm import rms_norm
from .precision import matmul
from .spec import evaluate_shape, load_spec_file
from .trace import Trace, emit
from .weights import subtree

CACHE_KINDS = ("latent", "naive", "paged", "fp8")


def embed_tokens(embedding: np.ndarray, tokens: np.ndarray, query_lengths: np.ndarray) -> np.ndarray:
    """MODEL.1 — ``hidden = Emb[tokens]``, no scaling; padding rows are 0 (V3R section 2, figure 2)."""
    real = np.arange(tokens.shape[1])[None, :] < query_lengths[:, None]  # [batch, seq]
    hidden = embedding[np.where(real, tokens, 0)]  # [batch, seq, hidden_size]
    return np.where(real[..., None], hidden, 0.0)


def attention_residual(config: ModelConfig, layer_weights: Mapping, hidden: np.ndarray, cache, query_lengths: np.ndarray,
                       start_positions, attention: str | None, trace: Trace | None = None):
    """MODEL.2 — ``x + MLA(RMSNorm(x; input_layernorm))`` (V3R section 2, figure 2; OFF Block.forward)."""
    normed = rms_norm(hidden, model_tensor(layer_weights, "input_layernorm.weight", trace), config.rms_norm_eps)
    result = mla_forward(config, subtree(layer_weights, "self_attn."), normed, start_positions, cache,
                         attention=attention, query_lengths=query_lengths, trace=trace)
    return hidden + result.output, result.cache  # [batch, seq, hidden_size], the layer's new cache


def ffn_residual(config: ModelConfig, layer_weights: Mapping, hidden: np.ndarray, layer: int, trace: Trace | None = None) -> np.ndarray:
    """MODEL.3 — ``x + FFN_layer(RMSNorm(x; post_attention_layernorm))``, dense or MoE by layer (V3R eq. 12, figure 2)."""
    normed = rms_norm(hidden, model_tensor(layer_weights, "post_attention_layernorm.weight", trace), config.rms_norm_eps)
    return hidden + ffn_forward(config, layer_weights, normed, layer, trace=trace).output  # [batch, seq, hidden_size]


def decoder_block(config: ModelConfig, weights: Mapping, layer: int, hidden: np.ndarray, cache, query_lengths: np.ndarray,
                  start_positions=None, attention: str | None = None, trace: Trace | None = None):
    """One pre-norm block of decoder layer (or MTP module) ``layer``: MODEL.2 then MODEL.3."""
    layer_weights = subtree(weights, f"model.layers.{layer}.")
    hidden, cache = attention_residual(config, layer_weights, hidden, cache, query_lengths, start_positions, attention, trace)
    hidden = emit(trace, "MODEL.2", hidden)
    return emit(trace, "MODEL.3", ffn_residual(config, layer_weights, hidden, layer, trace)), cache


def final_norm(config: ModelConfig, weights: Mapping, pre_norm_hidden: np.ndarray, trace: Trace | None = None) -> np.ndarray:
    """MODEL.4 — ``RMSNorm(h; model.norm)`` after the last block (V3R section 2, figure 2; OFF Transformer.forward)."""
    return rms_norm(pre_norm_hidden, model_tensor(weights, "model.norm.weight", trace), config.rms_norm_eps)


def lm_head_logits(lm_head: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """MODEL.5 — ``logits = h @ lm_head.T``, the untied output head (V3R section 2, eq. 23 for MTP)."""
    return matmul(hidden, lm_head.T)  # [..., vocab_size]


def greedy_token(logits: np.ndarray) -> np.ndarray:
    """MODEL.6 — ``argmax`` over the vocabulary, ties to the lowest token id (V3R section 5.4.3; OFF generate.py)."""
    return np.argmax(logits, axis=-1)  # [batch]


def cross_entropy(logits: np.ndarray, targets: np.ndarray, normaliser: int) -> float:
    """MODEL.7 — ``-(1 / (batch * normaliser)) * sum log softmax(logits)[targets]`` (V3R eq. 24)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)  # [batch, rows, vocab_size]
    log_norm = np.log(np.exp(shifted).sum(axis=-1))  # [batch, rows]
    target_logit = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]  # [batch, rows]
    return float(-(target_logit - log_norm).sum() / (logits.shape[0] * normaliser))


@dataclasses.dataclass(frozen=True)
class ModelCache:
    """One cache per decoder layer (or per MTP module), all holding the same positions; immutable."""

    layers: tuple[LayerCache, ...]

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, *, num_layers: int | None = None, kind: str = "latent",
              max_tokens: int | None = None, block_size: int = 64, shuffle_seed: int | None = None) -> "ModelCache":
        """Empty caches for ``num_layers`` layers (default the main stack): ``latent``, ``naive``, ``paged`` or ``fp8``
        (FP8 latent records, FP8.12, scale rule ue8m0; kv_lora_rank a multiple of 128).

        ``paged`` needs ``max_tokens`` (the capacity per sequence); ``shuffle_seed`` scatters
        each layer's block table (layer l uses seed ``shuffle_seed + l``). A DSA config
        (``index_topk`` set) gets a SparseCache per layer around the latent or paged one (DSA.7).
        """
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        if kind not in CACHE_KINDS:
            raise CacheError("kind", f"expected one of {list(CACHE_KINDS)}, got {kind!r}", "MODEL.2")
        if kind == "paged" and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise CacheError("max_tokens", f"a paged cache needs a capacity max_tokens >= 1, got {max_tokens!r}", "MLA.19")
        if kind == "naive" and config.sparse_attention:
            raise CacheError("kind", "a DSA config (index_topk set) caches latent rows and indexer keys: expected 'latent' or 'paged', got 'naive'", "DSA.7")
        if kind == "latent":
            layers: tuple = tuple(LatentCache.empty(config, batch) for _ in range(num_layers))
        elif kind == "naive":
            layers = tuple(NaiveCache.empty(config, batch) for _ in range(num_layers))
        elif kind == "fp8":
            layers = tuple(Fp8LatentCache.empty(config, batch) for _ in range(num_layers))
        else:
            layers = tuple(PagedLatentCache.empty(config, batch, max_tokens, block_size,
                                                  shuffle_seed=None if shuffle_seed is None else shuffle_seed + layer)
                           for layer in range(num_layers))
        if config.sparse_attention:
            layers = tuple(SparseCache.empty(config, batch, latent=latent) for latent in layers)
        return cls(layers)

    @property
    def lengths(self) -> np.ndarray:
        """Positions held per sequence ``[batch]`` (equal in every layer)."""
        return self.layers[0].lengths

    def truncate(self, lengths: npt.ArrayLike) -> "ModelCache":
        """Forget positions >= ``lengths`` in every layer (a rollback); lengths may only shrink."""
        return ModelCache(tuple(layer_cache.truncate(lengths) for layer_cache in self.layers))


@dataclasses.dataclass(frozen=True)
class ModelResult:
    """Outputs of :func:`model_forward`; padded rows are exactly 0."""

    logits: np.ndarray  # [batch, seq, vocab_size]
    pre_norm_hidden: np.ndarray  # [batch, seq, hidden_size]: the last block's output
    post_norm_hidden: np.ndarray  # [batch, seq, hidden_size]: after model.norm, the head's input
    cache: ModelCache | None


def model_forward(config: ModelConfig, weights: Mapping[str, np.ndarray], tokens: npt.ArrayLike, cache: ModelCache | None = None, *,
                  query_lengths: npt.ArrayLike | None = None, start_positions: npt.ArrayLike | None = None,
                  attention: str | None = None, trace: Trace | None = None) -> ModelResult:
    """The decoder stack on new tokens ``[batch, seq]`` (spec/model.yaml MODEL.1-MODEL.5).

    ``weights``: the full model under Hugging Face names. With a ``cache`` the new tokens follow
    the cached positions; without one token i of sequence b is at ``start_positions[b] + i``
    (default 0). ``query_lengths [batch]`` marks right padding (default all ``seq``).
    ``attention``: ``naive`` or ``absorbed`` (default per cache, see mla_forward). A trace records
    MODEL.1, MODEL.4, MODEL.5, and MODEL.2, MODEL.3 and the MLA and MOE steps of the last layer;
    with a precision profile it rounds every step output and weight (mla_ref.trace.emit).
    """
    tokens, lengths = check_tokens(config, tokens, query_lengths)
    check_model_weights(config, weights, range(config.num_hidden_layers))
    check_model_cache(config, cache, tokens.shape[0], config.num_hidden_layers)
    hidden = emit(trace, "MODEL.1", embed_tokens(model_tensor(weights, "model.embed_tokens.weight", trace), tokens, lengths))
    layer_caches = []
    for layer in range(config.num_hidden_layers):
        layer_cache = None if cache is None else cache.layers[layer]
        hidden, layer_cache = decoder_block(config, weights, layer, hidden, layer_cache, lengths, start_positions, attention,
                                            trace)  # MODEL.2, MODEL.3
        layer_caches.append(layer_cache)
    post_norm_hidden = emit(trace, "MODEL.4", final_norm(config, weights, hidden, trace))  # [batch, seq, hidden_size]
    logits = emit(trace, "MODEL.5", lm_head_logits(model_tensor(weights, "lm_head.weight", trace), post_norm_hidden))  # [.., vocab]
    finite_output("logits", logits, "MODEL.5")
    return ModelResult(logits, hidden, post_norm_hidden, None if cache is None else ModelCache(tuple(layer_caches)))


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """``tokens [batch, max_new_tokens]``, the ``logits [batch, max_new_tokens, vocab_size]`` each was chosen from, the cache."""

    tokens: np.ndarray
    logits: np.ndarray
    cache: ModelCache


def greedy_generate(config: ModelConfig, weights: Mapping[str, np.ndarray], prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    cache: ModelCache | None = None, *, attention: str | None = None,
                    forced_tokens: np.ndarray | None = None, trace: Trace | None = None) -> GenerationResult:
    """Prefill ragged ``prompts`` in one batch, then cached greedy decode (MODEL.6) of ``max_new_tokens`` each.

    ``cache`` defaults to an empty LatentCache per layer (FP8 records under a trace whose profile sets
    ``latent_cache_fp8``, on a V3.2-style config); pass ``ModelCache.empty(..., kind=...)`` for another. The returned cache holds the prompts and every new token but the last.
    ``forced_tokens [batch, max_new_tokens]`` replace the argmax (teacher forcing: the logits along
    another implementation's tokens, TOLERANCE.4).
    """
    tokens, lengths = pad_prompts(prompts)
    batch = tokens.shape[0]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InputError("max_new_tokens", f"expected an int >= 0, got {max_new_tokens!r}", "MODEL.6")
    if forced_tokens is not None:
        forced_tokens = check_tokens(config, forced_tokens, None)[0]
        if forced_tokens.shape != (batch, max_new_tokens):
            raise ShapeError("forced_tokens", f"expected [{batch}, {max_new_tokens}], got {list(forced_tokens.shape)}", "MODEL.6")
    if cache is None:  # FP8.12: the fp8 profile's emulation of a V3.2 config holds FP8 latent records, as V3.2 deploys them
        cache = ModelCache.empty(config, batch, kind="fp8" if trace is not None and trace.latent_cache_fp8(config) else "latent")
    result = model_forward(config, weights, tokens, cache, query_lengths=lengths, attention=attention, trace=trace)
    last_logits = result.logits[np.arange(batch), lengths - 1]  # [batch, vocab_size]
    new_tokens, step_logits = [], []
    for step in range(max_new_tokens):
        if step:
            result = model_forward(config, weights, new_tokens[-1][:, None], result.cache, attention=attention, trace=trace)
            last_logits = result.logits[:, 0]  # [batch, vocab_size]
        chosen = greedy_token(last_logits) if forced_tokens is None else forced_tokens[:, step]  # [batch]
        new_tokens.append(emit(trace, "MODEL.6", chosen))
        step_logits.append(last_logits)
    return GenerationResult(np.stack(new_tokens, axis=1) if new_tokens else np.zeros((batch, 0), np.int64),
                            np.stack(step_logits, axis=1) if step_logits else np.zeros((batch, 0, config.vocab_size)),
                            result.cache)


# ------------------------------------------------------------------ validation and plumbing

_READING_STEP = {"model.embed_tokens.weight": "MODEL.1", "model.norm.weight": "MODEL.4", "lm_head.weight": "MODEL.5"}


def model_tensor(weights: Mapping, name: str, trace: Trace | None = None) -> np.ndarray:
    """A float64 tensor of ``weights`` (shape checked by :func:`check_model_weights`), checked finite, rounded as the trace's profile stores weights."""
    value = checked_weight(name, np.asarray(weights[name]), np.float64, _READING_STEP.get(name, "MODEL.1"))
    return value if trace is None else trace.round_input(value, "weights")


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged prompts with 0: ``tokens [batch, longest]`` and ``lengths [batch]``; every prompt needs a token."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts", f"expected a non-empty sequence of token-id sequences, got {type(prompts).__name__}", "MODEL.1")
    rows = [np.asarray(prompt) for prompt in prompts]
    for index, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0 or (row.dtype.kind not in "iu"):
            raise InputError("prompts", f"prompt {index}: expected a non-empty 1-D sequence of integer ids, got {row.dtype} {list(row.shape)}", "MODEL.1")
    lengths = np.array([row.size for row in rows], np.int64)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int64)
    for index, row in enumerate(rows):
        tokens[index, : row.size] = row
    return tokens, lengths


def check_tokens(config: ModelConfig, tokens, query_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Integer ``tokens [batch, seq]`` and ``query_lengths [batch]``; ids of real positions within the vocabulary."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ShapeError("tokens", f"expected integer ids of shape [batch, seq], got {tokens.dtype} {list(tokens.shape)}", "MODEL.1")
    batch, seq = tokens.shape
    lengths = np.full(batch, seq, np.int64) if query_lengths is None else np.asarray(query_lengths)
    if lengths.shape != (batch,) or lengths.dtype.kind not in "iu" or (lengths < 0).any() or (lengths > seq).any():
        raise ShapeError("query_lengths", f"expected integers in 0 .. {seq} of shape [{batch}], got {lengths.dtype} {lengths.tolist()}", "MODEL.1")
    real = np.arange(seq)[None, :] < lengths[:, None]
    outside = real & ((tokens < 0) | (tokens >= config.vocab_size))
    if outside.any():
        b, i = (int(x) for x in np.argwhere(outside)[0])
        raise InputError("tokens", f"expected ids in 0 .. {config.vocab_size - 1} (vocab_size), got {int(tokens[b, i])} "
                         f"at sequence {b}, position {i}", "MODEL.1")
    return tokens.astype(np.int64), lengths.astype(np.int64)


@functools.lru_cache(maxsize=64)
def _declared_shapes(config: ModelConfig, group: str) -> dict[str, tuple[int, ...]]:
    """Relative names and shapes of one spec/weights.yaml group (``model``, ``layer``, ``mtp``)."""
    symbols = config.symbols()
    return {entry["name"]: evaluate_shape(entry["shape"], symbols) for entry in load_spec_file("weights.yaml")["tensors"][group]}


def check_model_weights(config: ModelConfig, weights: Mapping, layers, mtp: bool = False) -> None:
    """WeightError for a missing or mis-shaped model tensor, layer norm or (``mtp``) MTP tensor of ``layers``.

    Attention and FFN tensors are checked by mla_forward and ffn_forward when they run.
    """
    if not isinstance(weights, Mapping):
        raise WeightError("weights", f"expected a mapping name -> array, got {type(weights).__name__}", "MODEL.1")
    expected = dict(_declared_shapes(config, "model"))
    for layer in layers:
        for group in ("layer", "mtp") if mtp else ("layer",):
            expected.update({f"model.layers.{layer}.{name}": shape for name, shape in _declared_shapes(config, group).items()})
    for name, shape in expected.items():
        if name not in weights:
            raise WeightError(name, f"missing (expected shape {list(shape)})", "MTP.2" if mtp and name.startswith("model.layers.") else "MODEL.1")
        value = np.asarray(weights[name])
        if value.dtype.kind != "f" or value.shape != shape:
            raise WeightError(name, f"expected a float tensor of shape {list(shape)}, got {value.dtype} {list(value.shape)}", "MODEL.1")


def check_model_cache(config: ModelConfig, cache, batch: int, num_layers: int) -> None:
    """CacheError unless ``cache`` is None or a ModelCache of ``num_layers`` layers holding equal lengths."""
    if cache is None:
        return
    if not isinstance(cache, ModelCache):
        raise CacheError("cache", f"expected a ModelCache (one cache per layer), got {type(cache).__name__}", "MODEL.2")
    if len(cache.layers) != num_layers:
        raise CacheError("cache", f"expected {num_layers} layer caches, got {len(cache.layers)}", "MODEL.2")
    for layer, layer_cache in enumerate(cache.layers):
        if not isinstance(layer_cache, (LatentCache, NaiveCache, PagedLatentCache, Fp8LatentCache, SparseCache)):
            raise CacheError(f"cache.layers[{layer}]", f"expected LatentCache, NaiveCache, PagedLatentCache, Fp8LatentCache or SparseCache, "
                             f"got {type(layer_cache).__name__}", "MODEL.2")
        layer_cache.check(config, batch)
        if not np.array_equal(layer_cache.lengths, cache.lengths):
            raise CacheError(f"cache.layers[{layer}]", f"holds {layer_cache.lengths.tolist()} positions, layer 0 holds {cache.lengths.tolist()}", "MODEL.2")
