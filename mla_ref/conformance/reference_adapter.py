"""The reference itself behind the adapter protocol of spec/golden.yaml.

This is the minimal complete adapter (and the one the golden generator runs): every
entry point is a thin call into mla_ref. ``trace`` and ``attention`` are the generator's
own keywords; another adapter never needs them.
"""

from __future__ import annotations

import numpy as np

from ..cache import Fp8LatentCache, LatentCache
from ..config import from_dict
from ..dsa import SparseCache, indexer_forward
from ..dsa_cache import paged_index_logits, write_index_key_pages
from ..mla import latent_attention_core as core, mla_forward
from ..balance import bias_update, expert_load, sequence_balance_loss, v2_balance_losses
from ..dispatch import dispatch_plan as plan
from ..fp8 import BLOCK_SIZE
from ..fp8_cache import encode_latent_record
from ..dsa_kernel import sparse_decode_core as decode_core, sparse_prefill_core as prefill_core
from ..model import greedy_generate, model_forward
from ..moe import ffn_forward, route
from ..mtp import main_hidden_for_mtp, mtp_losses
from ..speculative import DraftContext, MTPDrafter, speculative_generate
from ..trace import emit

PROFILE = "fp64"


def _arithmetic(trace) -> np.dtype:
    """float32 when emulating a profile that computes in fp32 (TOLERANCE.2 arithmetic), else float64 (the truth)."""
    return np.dtype(np.float64) if trace is None else trace.arithmetic


def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, trace=None):
    """MLA.17 — FlashMLA-layout latent attention."""
    out, lse = core(q, k_cache, block_table, cache_seqlens, int(head_dim_v), float(softmax_scale), bool(causal),
                    dtype=_arithmetic(trace), trace=trace)
    return {"out": out, "lse": lse}


def sparse_decode_core(q, k_cache, indices, head_dim_v, softmax_scale, trace=None):
    """DSA.13 — FlashMLA's sparse decode over a paged latent cache (token-encoded indices, -1 invalid)."""
    out, lse = decode_core(q, k_cache, indices, int(head_dim_v), float(softmax_scale), dtype=_arithmetic(trace), trace=trace)
    return {"out": out, "lse": lse}


def sparse_prefill_core(q, kv, indices, softmax_scale, head_dim_v, trace=None):
    """DSA.14 — FlashMLA's sparse prefill over one KV (an index < 0 or >= s_kv invalid)."""
    out, lse = prefill_core(q, kv, indices, float(softmax_scale), int(head_dim_v), dtype=_arithmetic(trace), trace=trace)
    return {"out": out, "lse": lse}


def fp8_cache_write(rows, scales, trace=None):
    """FP8.10 — latent cache rows ``[tokens, kv_lora_rank + rope]`` to 656-byte records with the writer's explicit float32
    scales ``[tokens, kv_lora_rank / 128]`` (a float32 computation in every profile: the records are bytes)."""
    rank = BLOCK_SIZE * np.shape(scales)[-1]
    rows = np.asarray(rows)
    return {"records": encode_latent_record(rows[..., :rank], rows[..., rank:], scale=np.asarray(scales))}


def index_cache_write(keys, k_cache, slot_mapping, scale_rule, trace=None):
    """DSA.15-DSA.16 — indexer keys ``[tokens, index_head_dim]`` written as FP8 records into DeepGEMM's paged layout (a copy of
    ``k_cache``; bytes in every profile)."""
    return {"k_cache": emit(trace, "DSA.16", write_index_key_pages(k_cache, keys, slot_mapping, str(scale_rule)))}


def index_logits_paged(q, k_cache, logit_weights, context_lens, block_table, trace=None):
    """DSA.18 — DeepGEMM's fp8_paged_mqa_logits over the paged FP8 indexer key cache (q as e4m3 codes, its scale in weights)."""
    return {"logits": paged_index_logits(q, k_cache, logit_weights, context_lens, block_table, dtype=_arithmetic(trace), trace=trace)}


def mla_prefill(config, weights, hidden, start_positions, trace=None):
    """MLA.1-MLA.12 without a cache (naive form)."""
    result = mla_forward(from_dict(config), weights, hidden, start_positions, dtype=_arithmetic(trace), trace=trace)
    return {"output": result.output, "lse": result.lse}


def mla_extend(config, weights, hidden, cache_rows, cache_lengths, query_lengths, attention="absorbed", trace=None):
    """MLA layer after a cached prefix of latent rows: chunked prefill, decode or verification."""
    cfg = from_dict(config)
    cache = LatentCache(np.asarray(cache_rows, dtype=_arithmetic(trace)), np.asarray(cache_lengths, dtype=np.int64))
    result = mla_forward(cfg, weights, hidden, cache=cache, attention=attention, query_lengths=query_lengths,
                         dtype=_arithmetic(trace), trace=trace)
    batch, seq = np.shape(hidden)[:2]
    positions = cache.lengths[:, None] + np.arange(seq)[None, :]  # [batch, seq]
    written = np.arange(seq)[None, :] < np.asarray(query_lengths)[:, None]
    rows = np.where(written[..., None], result.cache.rows[np.arange(batch)[:, None], np.minimum(positions, result.cache.rows.shape[1] - 1)], 0.0)
    return {"output": result.output, "rows": rows, "lse": result.lse}


def dsa_indexer(config, weights, hidden, start_positions, forced_indices=None, trace=None):
    """DSA.1-DSA.10 — the lightning indexer's selected key positions (rank order, -1 pads) and masked scores
    (``forced_indices``: teacher forcing, another implementation's selection)."""
    result = indexer_forward(from_dict(config), weights, hidden, start_positions, dtype=_arithmetic(trace), forced_indices=forced_indices,
                             trace=trace)
    return {"indices": result.indices, "scores": result.scores}


def dsa_prefill(config, weights, hidden, start_positions, forced_indices=None, trace=None):
    """MLA.1-MLA.12 with DSA.1-DSA.10 narrowing attention to the selected keys, without a cache (naive form;
    ``forced_indices``: teacher forcing)."""
    result = mla_forward(from_dict(config), weights, hidden, start_positions, dtype=_arithmetic(trace), forced_indices=forced_indices,
                         trace=trace)
    return {"output": result.output, "indices": result.indices, "lse": result.lse}


def dsa_extend(config, weights, hidden, cache_rows, index_key_rows, cache_lengths, query_lengths, attention="absorbed",
               forced_indices=None, trace=None):
    """A DSA layer after a cached prefix of latent rows and indexer keys: chunked prefill (bottom-right causal) or decode
    (``forced_indices``: teacher forcing)."""
    cfg, dtype = from_dict(config), _arithmetic(trace)
    lengths = np.asarray(cache_lengths, dtype=np.int64)
    latent = LatentCache(np.asarray(cache_rows, dtype=dtype), lengths)
    if trace is not None and trace.latent_cache_fp8(cfg):  # FP8.12: the fp8 profile holds the handed-over prefix as FP8 records
        latent = Fp8LatentCache.empty(cfg, len(lengths), dtype).append(latent.rows, lengths)
    cache = SparseCache(latent, LatentCache(np.asarray(index_key_rows, dtype=dtype), lengths))
    result = mla_forward(cfg, weights, hidden, cache=cache, attention=attention, query_lengths=query_lengths, dtype=dtype,
                         forced_indices=forced_indices, trace=trace)
    batch, seq = np.shape(hidden)[:2]
    positions = np.minimum(lengths[:, None] + np.arange(seq)[None, :], result.cache.key_rows().shape[1] - 1)  # [batch, seq]
    written = (np.arange(seq)[None, :] < np.asarray(query_lengths)[:, None])[..., None]
    rows = np.where(written, result.cache.key_rows()[np.arange(batch)[:, None], positions], 0.0)
    index_keys = np.where(written, result.cache.index_key_rows()[np.arange(batch)[:, None], positions], 0.0)
    return {"output": result.output, "rows": rows, "index_keys": index_keys, "indices": result.indices, "lse": result.lse}


def moe_route(config, weights, hidden, forced_expert_ids=None, trace=None):
    """MOE.1-MOE.8 — expert ids and weights (``forced_expert_ids``: teacher forcing)."""
    routing = route(from_dict(config), weights, hidden, dtype=_arithmetic(trace), forced_expert_ids=forced_expert_ids, trace=trace)
    return {"expert_ids": routing.expert_ids, "weights": routing.weights}


def moe_layer(config, weights, hidden, layer, forced_expert_ids=None, trace=None):
    """MOE.1-MOE.13 — the feed-forward block of ``layer`` (``forced_expert_ids``: teacher forcing)."""
    result = ffn_forward(from_dict(config), weights, hidden, int(layer), dtype=_arithmetic(trace), forced_expert_ids=forced_expert_ids,
                         trace=trace)
    outputs = {"output": result.output}
    if result.routing is not None:
        outputs["expert_ids"] = result.routing.expert_ids
    return outputs


def moe_balance(config, scores, expert_ids, bias, trace=None):
    """MOE.14-MOE.17 — expert load, the bias update, the V3 sequence-wise loss and the V2 losses, per sequence."""
    cfg = from_dict(config)
    ids = np.asarray(expert_ids)
    if trace is not None:  # an implementation holds the scores in its own precision; the bias stays fp32 or better
        scores = trace.round_input(np.asarray(scores, dtype=np.float64))
    load = expert_load(cfg, ids.reshape(-1, ids.shape[-1]), trace=trace)
    sequence = sequence_balance_loss(cfg, scores, trace=trace)
    v2 = v2_balance_losses(cfg, scores, ids, trace=trace)
    return {"load": load, "new_bias": bias_update(cfg, bias, load, trace=trace), "sequence_loss": sequence.loss,
            "expert_loss": v2.expert_loss, "device_loss": v2.device_loss, "comm_loss": v2.comm_loss}


def dispatch_plan(config, expert_ids, ranks, trace=None):
    """MOE.18 — the expert-parallel dispatch plan."""
    result = plan(from_dict(config), expert_ids, int(ranks), trace=trace)
    return {"entries": result.entries, "counts": result.counts, "groups_per_token": result.groups_per_token}


def _prompts(prompt_tokens, prompt_lengths) -> list[list[int]]:
    return [list(map(int, row[:length])) for row, length in zip(np.asarray(prompt_tokens), np.asarray(prompt_lengths))]


def model_logits(config, weights, tokens, query_lengths, trace=None):
    """MODEL.1-MODEL.5 — logits of every position of a (right-padded) batch."""
    return {"logits": model_forward(from_dict(config), weights, tokens, query_lengths=query_lengths, trace=trace).logits}


def greedy_decode(config, weights, prompt_tokens, prompt_lengths, steps, forced_tokens=None, trace=None):
    """MODEL.6 — prefill the prompts, then ``steps`` cached greedy tokens and the logits each was chosen from
    (``forced_tokens``: teacher forcing, the logits along another implementation's tokens)."""
    result = greedy_generate(from_dict(config), weights, _prompts(prompt_tokens, prompt_lengths), int(steps),
                             forced_tokens=forced_tokens, trace=trace)
    return {"tokens": result.tokens, "logits": result.logits}


def mtp_forward(config, weights, tokens, mtp_lambda, trace=None):
    """MTP.1-MTP.6 and MODEL.7 — main and per-depth logits and losses; depth k's rows past seq - k are 0."""
    result = mtp_losses(from_dict(config), weights, tokens, mtp_lambda=float(mtp_lambda), trace=trace)
    depths, (batch, seq, vocab) = len(result.depth_logits), result.main_logits.shape
    depth_logits = np.zeros((depths, batch, seq, vocab))
    for index, logits in enumerate(result.depth_logits):
        depth_logits[index, :, : logits.shape[1]] = logits
    return {"main_logits": result.main_logits, "depth_logits": depth_logits, "main_loss": np.asarray(result.main_loss),
            "depth_losses": result.depth_losses, "mtp_loss": np.asarray(result.mtp_loss)}


def mtp_draft(config, weights, prompt_tokens, prompt_lengths, forced_drafts=None, trace=None):
    """MTP.7 — the D drafts after the known tokens t_0 .. t_n (the main model reads t_0 .. t_{n-1}) and their logits
    (``forced_drafts``: teacher forcing, the logits along another implementation's drafts)."""
    config = from_dict(config)
    tokens, lengths = np.asarray(prompt_tokens), np.asarray(prompt_lengths)
    main = model_forward(config, weights, tokens[:, :-1], query_lengths=lengths - 1, trace=trace)
    drafter = MTPDrafter(config, weights, trace=trace, forced_drafts=forced_drafts)
    main_hidden = emit(trace, "MTP.1", main_hidden_for_mtp(config, main))  # h^0 [batch, n, hidden_size]
    drafts = emit(trace, "MTP.7", drafter(DraftContext(tokens, lengths, main_hidden, drafter.num_draft_tokens)))
    return {"drafts": drafts, "logits": drafter.draft_logits}


def speculative_decode(config, weights, prompt_tokens, prompt_lengths, steps, forced_tokens=None, trace=None):
    """MTP.7-MTP.11 — greedy speculative decoding with the MTP drafter: the tokens and acceptance counts per depth
    (``forced_tokens``: teacher forcing, the acceptance counts along another implementation's tokens)."""
    result = speculative_generate(from_dict(config), weights, _prompts(prompt_tokens, prompt_lengths), int(steps),
                                  forced_tokens=forced_tokens, trace=trace)
    return {"tokens": result.tokens, "accepted_per_depth": result.accepted_per_depth, "proposed_per_depth": result.proposed_per_depth}
