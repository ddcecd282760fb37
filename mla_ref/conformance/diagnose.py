"""Name the systematic error behind a failure: constant ratios, LSE base, RoPE layout, and known-bug variants.

Two tools. A *signature* test looks at one failing tensor: is the candidate a constant
multiple of the truth (a softmax-scale or LSE-base bug), or the truth with its rope dims
permuted (interleaved vs half layout)? A *variant* test re-runs the reference with one
bug of the catalogue (shared/facts/bugs-in-the-wild.md) built as the bug itself: missing or
single m^2 with the cos/sin amplitude kept, the amplitude dropped, unscaled YaRN frequencies,
the 576^-0.5 scale, masks shifted or top-left, the kv norm skipped or over the rope part,
a rope key per head instead of the shared k_pe, the LSE in base 2, routing rules, weights and
scales, MTP chaining, its hnorm / enorm and its token shift. It works from the
outputs alone: a variant is named only when it explains the failed outputs better than the
correct reference by a clear factor (NAMING_FACTOR), otherwise the case says "no known
pattern".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Callable, Mapping

import numpy as np

from .. import dsa as dsa_module, dsa_cache as dsa_cache_module, fp8_cache as fp8_cache_module, mla as mla_module, moe as moe_module, mtp as mtp_steps, rope as rope_module
from ..cache import gather_paged_rows
from ..config import from_dict
from ..fp8 import AMAX_FLOOR, BLOCK_SIZE, decode_fp8, encode_fp8, ue8m0_scale
from ..mla import causal_visibility, latent_attention
from ..moe import BIAS, renormalises_topk, routing_weights
from ..norm import rms_norm
from ..rope import apply_rope, half_layout_permutation, rope_amplitude, rope_angles, softmax_scale, yarn_get_mscale
from .compare import Comparison, compare_tensor
from .protocol import call

NAMING_FACTOR = 4.0  # a variant is named when its L2 distance to the candidate is below 1 / NAMING_FACTOR of the truth's
NAMED_AT_MOST = 3
SET_OUTPUTS = ("indices",)  # outputs whose set along the last axis is specified, not its order (DSA.10)


def _ratio_names(config) -> dict[str, float]:
    """Factors that a known bug multiplies a logit or an LSE by."""
    names = {"log2(e): LSE in base 2 instead of the natural log": 1 / math.log(2)}
    if config.routed_scaling_factor != 1:
        names[f"1/{config.routed_scaling_factor:g}: routed_scaling_factor missing"] = 1 / config.routed_scaling_factor
        names[f"{config.routed_scaling_factor:g}: routed_scaling_factor applied twice"] = config.routed_scaling_factor
    m2 = yarn_get_mscale(config.rope_factor, config.mscale_all_dim) ** 2 if config.rope_scaling_type == "yarn" else 1.0
    if abs(m2 - 1) > 1e-6:
        names[f"1/m^2 = 1/{m2:.4f}: missing the YaRN mscale^2 on the softmax scale"] = 1 / m2
        names[f"m^2 = {m2:.4f}: mscale^2 applied twice"] = m2
    width = config.kv_lora_rank + config.qk_rope_head_dim
    used = softmax_scale(config)
    names[f"scale {width}^-0.5 (the absorbed width) instead of {used:.6g}"] = width ** -0.5 / used
    names[f"scale {config.qk_head_dim}^-0.5 without m^2 (the FlashInfer default)"] = config.qk_head_dim ** -0.5 / used
    if config.sparse_attention:  # DSA.3 / DSA.8: a positive factor on every index score leaves the selection alone
        names[f"sqrt(index_n_heads) = {config.index_n_heads ** 0.5:.4g}: indexer head weights without index_n_heads^-0.5 (DSA.3)"] = config.index_n_heads ** 0.5
        names[f"sqrt(index_head_dim) = {config.index_head_dim ** 0.5:.4g}: index scores without index_head_dim^-0.5 (DSA.8)"] = config.index_head_dim ** 0.5
    return names


def signature(name: str, candidate, truth: np.ndarray, config) -> list[str]:
    """Constant-ratio and permutation signatures of one failing tensor."""
    messages = []
    candidate = np.asarray(candidate, dtype=np.float64)
    if candidate.shape != truth.shape or truth.dtype.kind != "f":
        return messages
    finite = np.isfinite(truth) & np.isfinite(candidate)
    c, t = candidate[finite], truth[finite]
    if t.size >= 4 and np.dot(t, t) > 0:  # a scalar is always a multiple of the truth: no signature
        ratio = float(np.dot(c, t) / np.dot(t, t))
        residual = float(np.linalg.norm(c - ratio * t) / max(np.linalg.norm(c), 1e-300))
        fits = float(np.linalg.norm(c - ratio * t)) < float(np.linalg.norm(c - t)) / NAMING_FACTOR  # explains it better than the truth
        if not c.any():
            messages.append(f"{name} is all zeros (not computed, or not written back)")
        elif residual < 2e-2 and abs(ratio - 1) > 1e-3 and fits:
            known = [label for label, factor in _ratio_names(config).items()
                     if abs(factor - 1) > 2e-2 and abs(ratio / factor - 1) < 2e-2]  # a factor of ~1 names nothing here
            messages.append(f"{name} is {ratio:.4f} x the truth" + (f" ({known[0]})" if known else " (a constant factor: a scale bug)"))
    rope = config.qk_rope_head_dim
    if truth.ndim and truth.shape[-1] == rope and rope >= 4:
        permutation = half_layout_permutation(rope)
        for label, permuted in (("half-layout order", truth[..., permutation]), ("interleaved order", truth[..., np.argsort(permutation)])):
            if np.allclose(candidate, permuted, rtol=1e-2, atol=1e-2 * float(np.abs(truth[np.isfinite(truth)]).max(initial=0))):
                messages.append(f"{name} equals the truth with its rope dims in {label}: RoPE layout (interleaved vs half) mix-up")
                break
    return messages


def bias_in_weights(name: str, candidate, case: dict, config) -> list[str]:
    """MOE.8 signature: the candidate's routing weights are those of the biased selection scores (bias not selection-only)."""
    scores, bias = case["step"].get("MOE.2/scores"), case["weight"].get("mlp.gate.e_score_correction_bias")
    ids = case["output"].get("expert_ids", case["step"].get("MOE.7/expert_ids"))
    candidate = np.asarray(candidate, dtype=np.float64)
    if scores is None or bias is None or ids is None or candidate.shape != ids.shape:
        return []
    biased = routing_weights(config, scores + bias, ids)  # the weights with e_score_correction_bias left in
    if np.allclose(candidate, biased, rtol=1e-2, atol=1e-3 * float(np.abs(biased).max(initial=1.0))):
        return [f"{name} equals the weights of the biased scores: e_score_correction_bias added to the routing weights "
                "(it only selects experts, MOE.3 / MOE.8)"]
    return []


def _core_mask_variants(case: dict, args: dict) -> list[tuple[str, dict[str, np.ndarray]]]:
    """MLA.17 with the causal mask shifted: (description, {out, lse}) for the shifts kernels get wrong.

    A shifted mask either stays inside the cache or reads the slot just past it (where the
    golden cases keep a canary key).
    """
    inputs = case["input"]
    q, seqlens = np.asarray(inputs["q"], dtype=np.float64), np.asarray(inputs["cache_seqlens"])
    batch, s_q = q.shape[:2]
    key_rows = gather_paged_rows(np.asarray(inputs["k_cache"], dtype=np.float64), np.asarray(inputs["block_table"]), seqlens + 1)
    keys = np.arange(key_rows.shape[1])[None, None, :]
    shifts = (("causal mask off by one (+1): each query also sees the next key", seqlens - s_q + 1),
              ("causal mask off by one (-1): each query misses its own key (j < i, not j <= i)", seqlens - s_q - 1),
              ("causal mask aligned top-left (query i sees keys 0 .. i): the wrong origin after a cached prefix", np.zeros(batch, np.int64)))
    variants = []
    for description, offsets in shifts:
        causal = causal_visibility(offsets, np.full(batch, s_q), s_q, key_rows.shape[1])
        for where, limit in ((" within the cache", seqlens), (", reading the slot past the cache", seqlens + 1)):
            visible = causal & (keys < limit[:, None, None])
            out, lse = latent_attention(q, key_rows, visible, float(args["softmax_scale"]), int(args["head_dim_v"]))
            if not (variants and variants[-1][0].startswith(description) and np.array_equal(variants[-1][1]["out"], out)):
                variants.append((description + where, {"out": out, "lse": lse}))  # the slot past the cache changes something
    return variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """A well-known bug, built as the bug itself: the reference re-run with config fields changed, arguments shifted
    and reference functions replaced by their buggy twins (only where the bug changes that function)."""

    description: str
    config: dict = dataclasses.field(default_factory=dict)
    args: dict = dataclasses.field(default_factory=dict)
    patches: dict = dataclasses.field(default_factory=dict)  # (module, function name) -> the buggy function
    keeps_routing: bool = False  # changes the weights or the output only: judged under the candidate's accepted routing
    weights: Callable[[dict], dict] | None = None  # the case's weights as the bug reads them (FP8 scales)


_PATCHING = threading.RLock()


@contextlib.contextmanager
def _patched(patches: Mapping):
    """The reference with ``patches`` in place (restored afterwards, also on error).

    The patches replace module globals: one holder at a time (the lock), so two diagnoses in
    two threads never save each other's buggy twins as the originals; the reference run by
    another thread meanwhile would see them (diagnose a case at a time, or use --isolate).
    """
    with _PATCHING:
        saved = {key: getattr(*key) for key in patches}
        try:
            for (module, name), function in patches.items():
                setattr(module, name, function)
            yield
        finally:
            for (module, name), function in saved.items():
                setattr(module, name, function)


def _scale_and_rope_variants(config) -> list[Variant]:
    """MLA.4 / MLA.9 / MLA.14: the softmax scale and the YaRN factors wrong one at a time, everything else as configured."""
    base = config.qk_head_dim ** -0.5
    m = yarn_get_mscale(config.rope_factor, config.mscale_all_dim) if config.yarn_active else 1.0
    amplitude = rope_amplitude(config)

    def scale(value: float) -> dict:
        return {(mla_module, "softmax_scale"): lambda _config: value}

    def amplitude_of(value: float) -> dict:
        return {(rope_module, "rope_amplitude"): lambda _config: value}

    variants = []
    if abs(m - 1) > 1e-9:
        variants += [Variant("softmax scale without the YaRN m^2 (qk_head_dim^-0.5, cos/sin amplitude kept)", patches=scale(base)),
                     Variant("YaRN m applied once instead of squared on the softmax scale", patches=scale(base * m)),
                     Variant("YaRN m^2 applied twice (m^4) on the softmax scale", patches=scale(base * m ** 4))]
    if config.yarn_active:
        field_m = yarn_get_mscale(config.rope_factor, config.mscale)
        if abs(field_m - m) > 1e-9:
            variants.append(Variant("softmax m read from mscale instead of mscale_all_dim", patches=scale(base * field_m ** 2)))
        if config.mscale_all_dim != 0:
            variants.append(Variant("mscale_all_dim read as 0 (a missing field): no m^2 and cos/sin amplitude mscale(s, mscale)",
                                    config={"mscale_all_dim": 0.0}))
        if abs(amplitude - 1) > 1e-9:
            variants.append(Variant("cos/sin amplitude mscale(s, mscale) / mscale(s, mscale_all_dim) dropped", patches=amplitude_of(1.0)))
        generic = yarn_get_mscale(config.rope_factor, 1.0)
        if abs(generic - amplitude) > 1e-9:
            variants.append(Variant("generic YaRN amplitude 0.1 ln(s) + 1 on cos/sin", patches=amplitude_of(generic)))
        variants.append(Variant("YaRN frequencies not interpolated (plain RoPE frequencies, m^2 and amplitude kept)",
                                patches={(rope_module, "rope_frequencies"): rope_module.base_inverse_frequencies}))
        variants.append(Variant("YaRN not applied at all (plain RoPE, no m^2, no amplitude)", config={"rope_scaling_type": None}))
    width = config.kv_lora_rank + config.qk_rope_head_dim
    variants.append(Variant(f"softmax scale {width}^-0.5 (the latent row width kv_lora_rank + rope) instead of "
                            f"{softmax_scale(config):.6g}", patches=scale(width ** -0.5)))
    return variants


def _kv_norm_skipped(config, hidden, weights):
    """MLA.3 with kv_a_layernorm skipped: the raw latent."""
    _, k_pe = _reference_kv(config, hidden, weights)
    return hidden @ weights["kv_a_proj_with_mqa.weight"][: config.kv_lora_rank].T, k_pe


def _kv_norm_over_rope(config, hidden, weights):
    """MLA.3 with the RMS statistic over [latent | rope] and k_pe scaled by it too (gain 1 on the rope part)."""
    kv_a = hidden @ weights["kv_a_proj_with_mqa.weight"].T  # [batch, seq, kv_lora_rank + rope]
    gain = np.concatenate([weights["kv_a_layernorm.weight"], np.ones(config.qk_rope_head_dim)])
    normed = rms_norm(kv_a, gain, config.rms_norm_eps)
    return normed[..., : config.kv_lora_rank], normed[..., config.kv_lora_rank:]


def _per_head_rope_key() -> dict:
    """MLA.4 / MLA.7 with a rope key per head (the MHA partial-rotary habit): each head's key ends with its own k_nope tail
    rotated at the key's position, not the one decoupled k_pe shared by all heads (V2R 2.1.3). Only the naive form has
    per-head keys; the positions come from MLA.4 of the same layer call."""
    rotated_at = {}

    def rotate(config, q_pe, k_pe, positions, table_dtype=np.float64):
        rotated_at.update(config=config, positions=positions, table_dtype=table_dtype)
        return _reference_rotate(config, q_pe, k_pe, positions, table_dtype)

    def assemble(q_nope, q_pe, k_nope, k_pe):
        config = rotated_at["config"]
        cos, sin = rope_angles(config, rotated_at["positions"], k_nope.dtype, rotated_at["table_dtype"])  # [batch, keys, rope_half]
        per_head = apply_rope(k_nope[..., -k_pe.shape[-1]:], cos[:, :, None], sin[:, :, None], config.rope_layout)  # [batch, keys, heads, rope]
        q_full, k_full = _reference_assemble(q_nope, q_pe, k_nope, k_pe)
        return q_full, np.concatenate([k_full[..., : k_nope.shape[-1]], per_head], axis=-1)
    return {(mla_module, "rotate_query_key"): rotate, (mla_module, "assemble_query_key"): assemble}


_reference_kv = mla_module.kv_latent_and_rope_key
_reference_rotate = mla_module.rotate_query_key
_reference_assemble = mla_module.assemble_query_key
_reference_mtp_module = mtp_steps.mtp_module
_reference_visibility = mla_module.causal_visibility
_reference_softmax = mla_module.masked_softmax
_reference_routing_weights = moe_module.routing_weights
_reference_record_scales = fp8_cache_module.record_scales
_reference_index_scales = dsa_cache_module.index_scales
_reference_record_rope = fp8_cache_module.record_rope


def _shifted_mask(shift: int | None):
    """MLA.8 with its diagonal moved by ``shift`` keys, or aligned top-left (``None``: query i sees keys 0 .. i)."""
    def visibility(key_offsets, query_lengths, num_queries, num_keys):
        offsets = np.zeros_like(key_offsets) if shift is None else np.asarray(key_offsets) + shift
        return _reference_visibility(offsets, query_lengths, num_queries, num_keys)
    return visibility


def _lse_base_two(logits, visible):
    probs, lse = _reference_softmax(logits, visible)
    return probs, lse / math.log(2)


def _attention_variants(point: str, config) -> list[Variant]:
    """MLA layer bugs of the catalogue: scale and YaRN, layout, norms, masks, LSE base, positions."""
    variants = _scale_and_rope_variants(config)
    variants += [
        Variant("RoPE pairs in the other layout (interleaved vs half)",
                config={"rope_layout": "half" if config.rope_layout == "interleaved" else "interleaved"}),
        Variant("RMSNorm eps 1e-5 instead of the config's", config={"rms_norm_eps": 1e-5}),
        Variant("kv_a_layernorm skipped (the raw latent)", patches={(mla_module, "kv_latent_and_rope_key"): _kv_norm_skipped}),
        Variant("kv norm taken over [latent | rope] and applied to k_pe too",
                patches={(mla_module, "kv_latent_and_rope_key"): _kv_norm_over_rope}),
        Variant("causal mask off by one (+1): each query also sees the next key",
                patches={(mla_module, "causal_visibility"): _shifted_mask(+1)}),
        Variant("causal mask off by one (-1): each query misses its own key (j < i, not j <= i)",
                patches={(mla_module, "causal_visibility"): _shifted_mask(-1)}),
        Variant("LSE in base 2 instead of the natural log", patches={(mla_module, "masked_softmax"): _lse_base_two}),
        Variant("k_pe not shared across heads: each head's rope key is its own k_nope tail rotated (MHA partial-rotary habit) "
                "instead of the one decoupled k_pe", patches=_per_head_rope_key()),
    ]
    if point == "mla_extend":
        variants.append(Variant("causal mask aligned top-left (query i sees keys 0 .. i): the wrong origin after a cached prefix",
                                patches={(mla_module, "causal_visibility"): _shifted_mask(None)}))
    if point == "mla_prefill":
        variants += [Variant("positions off by one (+1)", args={"start_positions": +1}),
                     Variant("positions off by one (-1)", args={"start_positions": -1})]
    return variants


def _minus_one_read_as(row: str):
    """DSA.13 / DSA.14 indices with every -1 made a real row: row 0 (clamped, as a gather that zeroes negative indices
    reads) or the last row (Python / torch negative indexing)."""
    def indices(inputs: dict) -> np.ndarray:
        index = np.asarray(inputs["indices"])
        rows = inputs["kv"].shape[0] if "kv" in inputs else inputs["k_cache"].shape[0] * inputs["k_cache"].shape[1]
        return np.where(index == -1, 0 if row == "first" else rows - 1, index)
    return indices


def _page_major_indices(inputs: dict) -> np.ndarray:
    """DSA.13 indices decoded page-major (page = index % num_blocks, offset = index // num_blocks), re-encoded as tokens."""
    index = np.asarray(inputs["indices"])
    num_blocks, block_size = inputs["k_cache"].shape[:2]
    return np.where(index >= 0, (index % num_blocks) * block_size + index // num_blocks, index)


def _sparse_core_variants(point: str) -> list[Variant]:
    """FlashMLA sparse-kernel bugs (DSA.13, DSA.14): the default scale, the LSE base, -1 padding attended, the index encoding."""
    variants = [Variant("softmax scale 576^-0.5 style (FlashMLA's default): 1/sqrt(q width) instead of the passed scale",
                        args={"softmax_scale": "width"}),
                Variant("LSE in base 2 instead of the natural log (FlashMLA's first sparse release)",
                        patches={(mla_module, "masked_softmax"): _lse_base_two}),
                Variant("-1 padding attended: read as row 0 (a clamped gather)", args={"indices": _minus_one_read_as("first")}),
                Variant("-1 padding attended: read as the last row (negative indexing)", args={"indices": _minus_one_read_as("last")})]
    if point == "sparse_decode_core":
        variants.append(Variant("indices decoded page-major (page = index % num_blocks, offset = index // num_blocks) instead of "
                                "page * block_size + offset", args={"indices": _page_major_indices}))
    return variants


def _bf16_record_scales(records: np.ndarray, kv_lora_rank: int) -> np.ndarray:
    """FP8.11 read with 2-byte bf16 scales at the scales' offset (the record stores float32)."""
    halves = np.ascontiguousarray(records[..., kv_lora_rank: kv_lora_rank + 2 * (kv_lora_rank // BLOCK_SIZE)]).view("<u2")
    return (halves.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _record_scales_after_rope(records: np.ndarray, kv_lora_rank: int) -> np.ndarray:
    """FP8.11 read with the scales taken from the record's last bytes (a [latent | rope | scales] layout)."""
    return np.ascontiguousarray(records[..., -4 * (kv_lora_rank // BLOCK_SIZE):]).view("<f4").astype(np.float64)


def _fp8_cache_variants() -> list[Variant]:
    """FP8.11 reader bugs (E5 and the record layout): the reference's decoder with one field read wrong."""
    def scales(twin) -> dict:
        return {(fp8_cache_module, "record_scales"): twin}
    return [
        Variant("FP8 cache codes read as e4m3fnuz: OCP codes with the FNUZ bias, every latent value x0.5 (E5 reversed)",
                patches={(fp8_cache_module, "decode_fp8"): lambda codes: decode_fp8(codes, "e4m3fnuz")}),
        Variant("FP8 cache scales doubled (FNUZ-normalised scales on OCP codes): every latent value x2 (E5)",
                patches=scales(lambda records, rank: 2.0 * _reference_record_scales(records, rank))),
        Variant("FP8 cache scales read as bf16 (2 bytes each) where the record stores float32", patches=scales(_bf16_record_scales)),
        Variant("FP8 cache scales applied in reverse order",
                patches=scales(lambda records, rank: _reference_record_scales(records, rank)[..., ::-1])),
        Variant("FP8 cache scales read after the rope part (a [latent | rope | scales] layout)", patches=scales(_record_scales_after_rope)),
        Variant("FP8 cache rope part quantised to e4m3 (it is stored as bf16)",
                patches={(fp8_cache_module, "record_rope"): lambda records, rank: decode_fp8(encode_fp8(_reference_record_rope(records, rank)))}),
    ]


FNUZ_WRITER_MAX = 224.0  # vLLM / SGLang quantise to +-224 on FNUZ hardware (gfx942), not to e4m3fnuz's 240


def _fnuz_range_index_key_scale(amax, scale_rule: str = "ue8m0") -> np.ndarray:
    """DSA.15 as a gfx942 writer computes it: max(amax, 1e-4) / 224 (the FNUZ range), twice the OCP scale."""
    scale = np.maximum(np.asarray(amax, dtype=np.float32), np.float32(AMAX_FLOOR)) / np.float32(FNUZ_WRITER_MAX)
    return ue8m0_scale(scale) if scale_rule == "ue8m0" else scale


def _index_cache_variants(point: str) -> list[Variant]:
    """Indexer key cache bugs (DSA.15-DSA.18): the FNUZ / OCP mix-ups of vLLM #52109 and gfx942 writers, the record
    token-interleaved as the [block_size, 1, D + 4] view suggests."""
    if point == "index_cache_write":
        return [Variant("indexer K cache scales from the FNUZ range (max(amax, 1e-4) / 224, gfx942): every scale x2",
                        patches={(dsa_cache_module, "index_key_scale"): _fnuz_range_index_key_scale}),
                Variant("indexer K cache record token-interleaved (each token's scale right after its codes) instead of "
                        "DeepGEMM's page layout (all codes, then all scales)",
                        patches={(dsa_cache_module, "page_fields"): lambda pages: (pages[:, :, 0, :-4], pages[:, :, 0, -4:])})]
    return [Variant("indexer K cache codes read as e4m3fnuz (OCP codes with the FNUZ bias, vLLM #52109): every key x0.5, "
                    "code 0x80 (-0) NaN",
                    patches={(dsa_cache_module, "decode_index_keys"):
                             lambda codes, scale_bytes: decode_fp8(codes, "e4m3fnuz") * _reference_index_scales(scale_bytes)[..., None]})]


def _routing_variants(config, case: dict) -> list[Variant]:
    """MOE.2-MOE.8 and MOE.12 bugs of the catalogue."""
    variants = [
        Variant("the other score function (sigmoid vs softmax)", config={"scoring_func": "softmax" if config.scoring_func == "sigmoid" else "sigmoid"}),
        Variant("the other group score rule (max vs top-2 sum)", config={"group_score_rule": "max" if config.group_rule == "top2_sum" else "top2_sum"}),
        Variant("dropped groups filled with 0.0 instead of -inf", config={"group_mask_fill": "zero" if config.group_mask_fill == "-inf" else "-inf"}),
        Variant("topk_group ignored (no group limit)", config={"topk_group": config.n_group}),
        Variant("top-k weights not renormalised" if renormalises_topk(config) else "top-k weights renormalised although the config says not",
                patches={(moe_module, "renormalises_topk"): (lambda _config: False) if renormalises_topk(config) else (lambda _config: True)},
                keeps_routing=True),
        Variant("routed_scaling_factor applied twice", config={"routed_scaling_factor": config.routed_scaling_factor ** 2}, keeps_routing=True)
        if config.routed_scaling_factor != 1 else None,
        Variant("routed_scaling_factor missing", config={"routed_scaling_factor": 1.0}, keeps_routing=True)
        if config.routed_scaling_factor != 1 else None,
    ]
    bias = case["weight"].get(BIAS)
    if config.has_correction_bias and bias is not None:
        biased = np.asarray(bias, dtype=np.float64)
        variants += [
            Variant("e_score_correction_bias ignored (the experts chosen by the unbiased scores)",
                    patches={(moe_module, "selection_scores"): lambda scores, _bias: scores}),
            Variant("e_score_correction_bias added to the routing weights (it only selects experts, MOE.3 / MOE.8)",
                    patches={(moe_module, "routing_weights"): lambda cfg, scores, ids: _reference_routing_weights(cfg, scores + biased, ids)},
                    keeps_routing=True),
        ]
    return [variant for variant in variants if variant is not None]


def _mtp_norms(embedding_norm: str | None, hidden_norm: str | None) -> dict:
    """MTP.2 with the embedding half normed by the module weight ``embedding_norm`` and the hidden half by ``hidden_norm``
    (None: that norm skipped, the half enters eh_proj raw)."""
    def combine(config, module_weights, embedded, previous_hidden, trace=None):
        def half(x, norm):
            return x if norm is None else rms_norm(x, np.asarray(module_weights[norm], dtype=np.float64), config.rms_norm_eps)
        halves = [half(embedded, embedding_norm), half(previous_hidden, hidden_norm)]  # [batch, rows, hidden_size] each
        if config.mtp_concat_order != "embedding_first":
            halves.reverse()
        return np.concatenate(halves, axis=-1) @ np.asarray(module_weights["eh_proj.weight"], dtype=np.float64).T
    return {(mtp_steps, "combine_embedding_and_hidden"): combine}


def _mtp_token_shift(tokens, shift: int) -> dict:
    """MTP.2 with depth k embedding t_{i+k+shift} instead of t_{i+k} (bugs H14: ids rolled once too few or too many times)."""
    tokens = np.asarray(tokens)

    def module(config, weights, depth, previous_hidden, next_tokens, **options):
        first = depth + shift
        return _reference_mtp_module(config, weights, depth, previous_hidden, tokens[:, first: first + next_tokens.shape[1]], **options)
    return {(mtp_steps, "mtp_module"): module}


def _mtp_variants(config, case: dict, point: str) -> list[Variant]:
    """MTP.1 / MTP.2 chaining conventions and pitfalls of the catalogue (H1, H14, H15)."""
    variants = [Variant("MTP concat order swapped ([hnorm(h) ; enorm(Emb)] vs [enorm(Emb) ; hnorm(h)])",
                        config={"mtp_concat_order": "hidden_first" if config.mtp_concat_order == "embedding_first" else "embedding_first"}),
                Variant("MTP fed the main model's hidden state before / after the final norm (the other mtp_hidden_source)",
                        config={"mtp_hidden_source": "pre_norm" if config.mtp_hidden_source == "post_norm" else "post_norm"}),
                Variant("MTP hnorm skipped (the carried hidden state enters eh_proj raw)", patches=_mtp_norms("enorm.weight", None)),
                Variant("MTP enorm skipped (the embedding enters eh_proj raw)", patches=_mtp_norms(None, "hnorm.weight")),
                Variant("MTP hnorm and enorm swapped (the embedding normed by hnorm, the hidden state by enorm)",
                        patches=_mtp_norms("hnorm.weight", "enorm.weight"))]
    if point == "mtp_forward":
        variants += [Variant("MTP token shift off by one: depth k embeds t_{i+k-1} instead of t_{i+k} (the ids not shifted)",
                             patches=_mtp_token_shift(case["input"]["tokens"], -1)),
                     Variant("MTP token shift off by one: depth k embeds t_{i+k+1} instead of t_{i+k} (the ids shifted twice)",
                             patches=_mtp_token_shift(case["input"]["tokens"], +1))]
    return variants


def _fp8_variants(weights: Mapping) -> list[Variant]:
    """FP8.4 bugs on an FP8 checkpoint (spec/fp8.yaml pitfalls): the reference on the weights as the bug reads them."""
    suffix = "_scale_inv"
    scaled = [name[: -len(suffix)] for name in weights if name.endswith(suffix) and name[: -len(suffix)] in weights]
    if not scaled:
        return []

    def scales(change):
        return lambda w: {**w, **{name + suffix: change(np.asarray(w[name + suffix], dtype=np.float32)) for name in scaled}}

    def rows_scaled_by(block_row):  # decode(code[i, j]) * scale[block_row(i, rows, scale rows), j // 128], as float weights
        def read(w):
            dequantized = {name: value for name, value in w.items() if not name.endswith(suffix)}
            for name in scaled:
                codes, scale = np.asarray(w[name]), np.asarray(w[name + suffix], dtype=np.float64)
                rows = np.minimum(block_row(np.arange(codes.shape[0]), codes.shape[0], scale.shape[0]), scale.shape[0] - 1)
                dequantized[name] = decode_fp8(codes) * np.repeat(scale[rows], BLOCK_SIZE, axis=1)[:, : codes.shape[1]]
            return dequantized
        return read

    variants = [Variant("FP8 weight_scale_inv not applied (the codes read as values)", weights=scales(np.ones_like), keeps_routing=True),
                Variant("FP8 weight_scale_inv divided instead of multiplied", weights=scales(lambda s: np.float32(1) / s), keeps_routing=True),
                Variant("FP8 block size inferred from the shapes (rows / scale rows) instead of 128",
                        weights=rows_scaled_by(lambda i, rows, blocks: i // -(-rows // blocks)), keeps_routing=True),
                Variant("FP8 edge block given its neighbour's scale (the last full block's)",
                        weights=rows_scaled_by(lambda i, rows, blocks: np.minimum(i // BLOCK_SIZE, max(rows // BLOCK_SIZE - 1, 0))),
                        keeps_routing=True)]
    if any(np.any(np.frexp(np.asarray(weights[name + suffix], dtype=np.float64))[0] != 0.5) for name in scaled):
        variants.append(Variant("FP8 weight scales truncated to powers of two (amax / 448 scales read as ue8m0)",
                                weights=scales(lambda s: np.ldexp(np.float32(0.5), np.frexp(s)[1]).astype(np.float32)), keeps_routing=True))
    return variants


_reference_indexer_rope = dsa_module.indexer_rope
_reference_hadamard = dsa_module.hadamard_rotate
_reference_select_top_k = dsa_module.select_top_k


def _indexer_rope_variant(layout: str, rope_last: bool):
    """DSA.4 in ``layout`` pairs, on the first (EXP) or the last (``rope_last``, MLA's [nope | rope]) qk_rope_head_dim dims."""
    def indexer_rope(config, q_index, k_index, positions, table_dtype=np.float64):
        rope = config.qk_rope_head_dim
        part = slice(-rope, None) if rope_last else slice(0, rope)
        cos, sin = rope_angles(config, positions, q_index.dtype, table_dtype)  # [batch, seq, rope_half]
        q, k = q_index.copy(), k_index.copy()
        q[..., part] = apply_rope(q_index[..., part], cos[:, :, None, :], sin[:, :, None, :], layout)
        k[..., part] = apply_rope(k_index[..., part], cos, sin, layout)
        return q, k
    return indexer_rope


def _hadamard_on(queries: bool, keys: bool):
    """DSA.5 applied to the index queries ([batch, seq, heads, dim]) and / or the keys ([batch, seq, dim]) only."""
    return lambda x: _reference_hadamard(x) if (queries if x.ndim == 4 else keys) else x


def _relu_after_head_weights(q_hat, k_hat, head_weights):
    """DSA.8 with the ReLU on each weighted head product: sum_h ReLU(w[t, h] * d^-0.5 * q_hat[t, h] . k_hat[s])."""
    dots = np.einsum("bthd,bsd->bths", q_hat, k_hat) * q_hat.shape[-1] ** -0.5  # [batch, seq, heads, keys]
    return np.maximum(dots * head_weights[..., None], 0.0).sum(axis=2)


def _top_k_unclamped(masked_scores, index_topk):
    """DSA.10 keeping min(index_topk, keys) positions even where fewer are visible (-inf positions instead of -1)."""
    indices = _reference_select_top_k(masked_scores, index_topk)
    order = np.argsort(-masked_scores, axis=-1, kind="stable")[..., : indices.shape[-1]]
    return np.where(indices >= 0, indices, order)


def _dense_sparse_attention(case: dict):
    """DSA.11-DSA.12 replaced by latent attention over every visible key (bottom-right causal after the case's prefix)."""
    inputs = case["input"]
    def attention(q_latent, key_rows, indices, scale, head_dim_v, query_chunk=None, trace=None):
        batch, seq = q_latent.shape[:2]
        offsets = np.asarray(inputs.get("cache_lengths", np.zeros(batch, np.int64)))
        lengths = np.asarray(inputs.get("query_lengths", np.full(batch, seq)))
        visible = causal_visibility(offsets, lengths, seq, key_rows.shape[1])
        return latent_attention(q_latent, key_rows, visible, scale, head_dim_v)
    return attention


def _dsa_variants(config, case: dict | None) -> list[Variant]:
    """DSA bugs of the catalogue (facts A5, spec/dsa.yaml pitfalls); ``case`` None: the stack of a model-level case."""
    dense = {(dsa_module, "selected_visibility"): lambda indices, num_keys: np.ones(indices.shape[:2] + (num_keys,), bool)}
    if case is not None:
        dense[(dsa_module, "sparse_attention")] = _dense_sparse_attention(case)
    if case is not None and "index_key_rows" in case["input"]:  # the cached keys carry the Hadamard: the missing side shows
        hadamard = [Variant("Hadamard missing on the index queries (keys rotated)", patches={(dsa_module, "hadamard_rotate"): _hadamard_on(False, True)}),
                    Variant("Hadamard missing on the new index keys (queries and cached keys rotated)",
                            patches={(dsa_module, "hadamard_rotate"): _hadamard_on(True, False)}),
                    Variant("Hadamard missing on both index queries and new keys (the cached keys carry it)",
                            patches={(dsa_module, "hadamard_rotate"): _hadamard_on(False, False)})]
    else:  # q.(H k) = (H q).k for the symmetric H: the scores cannot tell the side, and both sides missing changes nothing
        hadamard = [Variant("Hadamard on one side of the index scores only (queries or keys: H is symmetric, the side does not show)",
                            patches={(dsa_module, "hadamard_rotate"): _hadamard_on(True, False)})]
    return [
        Variant("indexer RoPE in interleaved pairs (DeepSeek-V3.2-Exp before 8631a81; the indexer is NeoX)",
                patches={(dsa_module, "indexer_rope"): _indexer_rope_variant("interleaved", rope_last=False)}),
        Variant("indexer RoPE on the last qk_rope_head_dim dims ([nope | rope] as MLA; the indexer is [rope | nope])",
                patches={(dsa_module, "indexer_rope"): _indexer_rope_variant("half", rope_last=True)}),
        *hadamard,
        Variant("ReLU after the index head weights (not before)", patches={(dsa_module, "index_scores"): _relu_after_head_weights}),
        Variant("no causal mask before the indexer's top-k (future keys selectable)",
                patches={(dsa_module, "index_visibility"): lambda scores, visible: scores}),
        Variant("indexer top-k not clamped to the visible keys (-inf positions kept instead of -1)",
                patches={(dsa_module, "select_top_k"): _top_k_unclamped}),
        Variant("dense attention: the indexer's selection ignored", patches=dense),
    ]


def _variants(entry: dict, config, case: dict) -> list[Variant]:
    """The known-bug variants for this entry point."""
    point = entry["entry_point"]
    variants: list[Variant] = []
    if point in ("mla_prefill", "mla_extend"):
        variants += _attention_variants(point, config)
    if point in ("dsa_indexer", "dsa_prefill", "dsa_extend"):
        variants += _dsa_variants(config, case)
    if point == "latent_attention_core":
        variants.append(Variant("one key too many: the canary past cache_seqlens is attended", args={"cache_seqlens": +1}))
        variants.append(Variant("the causal mask is not applied", args={"causal": "flip"}))
        variants.append(Variant("softmax scale 576^-0.5 style: 1/sqrt(q width) instead of the passed scale", args={"softmax_scale": "width"}))
        if np.asarray(case["input"]["k_cache"]).dtype == np.uint8:
            variants += _fp8_cache_variants()
    if point in ("sparse_decode_core", "sparse_prefill_core"):
        variants += _sparse_core_variants(point)
        if point == "sparse_decode_core" and np.asarray(case["input"]["k_cache"]).dtype == np.uint8:
            variants += _fp8_cache_variants()
    if point in ("index_cache_write", "index_logits_paged"):
        variants += _index_cache_variants(point)
    if point in ("moe_route", "moe_layer"):
        variants += _routing_variants(config, case)
    if point in MODEL_LEVEL:  # the same bugs inside every layer of the stack
        variants += [variant for variant in _attention_variants(point, config) if not variant.args]
        variants += [variant for variant in _routing_variants(config, {"weight": {}}) if config.moe_layers]
        variants += _dsa_variants(config, None) if config.sparse_attention else []
    if point in ("mtp_forward", "mtp_draft", "speculative_decode"):
        variants += _mtp_variants(config, case, point)
    return variants + _fp8_variants(case.get("weight", {}))


MODEL_LEVEL = ("model_logits", "greedy_decode", "mtp_forward", "mtp_draft", "speculative_decode")


def _shifted(args: dict, inputs: dict, changes: dict, width: int) -> tuple[dict, dict]:
    args, inputs = dict(args), dict(inputs)
    for key, change in changes.items():
        if callable(change):
            inputs[key] = change(inputs)
        elif key in inputs:
            inputs[key] = np.maximum(np.asarray(inputs[key]) + change, 0)
        elif change == "flip":
            args[key] = not args[key]
        elif change == "width":
            args[key] = width ** -0.5
    return args, inputs


def diagnose(entry: dict, case: dict, produced: Mapping, profile: str, failures: list[Comparison]) -> list[str]:
    """Human-readable guesses for the failures of one case; "no known pattern" where nothing explains them.

    ``case["output"]`` is the truth the outputs were judged against (under the candidate's accepted routing
    or tokens, TOLERANCE.4). A variant is named only when it explains every failed output better than the
    truth by NAMING_FACTOR in L2, or within the profile's allowance.
    """
    from . import reference_adapter
    config = from_dict(entry["config"])
    messages = []
    for failure in failures:
        name = failure.name
        truth = case["output"].get(name) if "/" not in name else case["step"].get(name)
        if truth is not None and name in produced:
            messages += signature(name, produced[name], truth, config)
        if name in ("weights", "MOE.8/weights") and entry["entry_point"] in ("moe_route", "moe_layer") and name in produced:
            messages += bias_in_weights(name, produced[name], case, config)
    failed_outputs = [f.name for f in failures if "/" not in f.name and f.name in produced and f.name in case["output"]]
    if not failed_outputs:
        return messages
    noises = entry["profiles"].get(profile, {}).get("noise", {})
    explained: list[tuple[float, str]] = []
    masks = _core_mask_variants(case, entry["args"]) if entry["entry_point"] == "latent_attention_core" and entry["args"].get("causal") else []
    for description, expected in masks:
        closeness = _closeness(failed_outputs, produced, expected, case, noises, profile)
        if closeness is not None:
            explained.append((closeness, description))
    width = int(np.shape(case["input"]["q"])[-1]) if "q" in case["input"] else 0
    forced = _accepted_routing(entry, produced, failures)
    variants = _variants(entry, config, case)
    for variant in variants:
        try:
            changed = from_dict({**entry["config"], **variant.config})
            args, inputs = _shifted(entry["args"], case["input"], variant.args, width)
            weights = dict(case["weight"]) if variant.weights is None else variant.weights(dict(case["weight"]))
            available = {**inputs, **args, "config": changed.to_dict(), "weights": weights}
            extra = {"forced_expert_ids": forced} if forced is not None and variant.keeps_routing else {}
            with _patched(variant.patches):
                expected = call(getattr(reference_adapter, entry["entry_point"]), entry["entry_point"], available, **extra)
        except Exception:  # noqa: BLE001 - a variant that cannot run says nothing
            continue
        closeness = _closeness(failed_outputs, produced, expected, case, noises, profile)
        if closeness is not None:
            explained.append((closeness, variant.description))
    explained.sort(key=lambda item: item[0])
    messages = [f"matches the reference with this bug: {description} (L2 distance {100 * closeness:.3g}% of the correct "
                "reference's)" for closeness, description in explained[:NAMED_AT_MOST]] + messages  # the specific name first
    if not messages:
        tried = len(variants) + len(masks)
        messages.append(f"no known pattern: none of the {tried} known bug variants tried for {entry['entry_point']} explains "
                        f"{', '.join(failed_outputs)} better than the correct reference (by {NAMING_FACTOR:g}x in L2)"
                        if tried else f"no known pattern (no bug variants are catalogued for {entry['entry_point']})")
    return messages


def _accepted_routing(entry: dict, produced: Mapping, failures: list[Comparison]) -> np.ndarray | None:
    """The candidate's expert ids where they were accepted (TOLERANCE.4): weight and output bugs are judged under them."""
    if entry["entry_point"] not in ("moe_route", "moe_layer") or "expert_ids" not in produced:
        return None
    if any(failure.name == "expert_ids" for failure in failures):
        return None
    return np.asarray(produced["expert_ids"])


def _closeness(failed_outputs: list[str], produced: Mapping, expected: Mapping, case: dict, noises: dict,
               profile: str) -> float | None:
    """How close a bug variant comes to the candidate: the largest ``||candidate - variant|| / ||candidate - truth||``
    over the failed outputs, when the variant explains each (an exact match for integers; within the allowance or
    below 1 / NAMING_FACTOR for floats), differs from the truth and keeps the passing outputs; else None. Integer
    outputs alone (acceptance counts: every broken drafter gets 0) name nothing, except a selection (SET_OUTPUTS, compared
    as a set) that the variant reproduces exactly."""
    worst, differs, measured = 0.0, False, False
    for name in failed_outputs:
        if name not in expected:
            return None
        candidate, variant, truth = (_as_compared(name, value) for value in (produced[name], expected[name], case["output"][name]))
        if candidate.shape != truth.shape or variant.shape != truth.shape:
            return None
        noise = noises.get(f"output:{name}", 0.0)
        differs = differs or not compare_tensor(name, variant, truth, noise, profile).passed
        if truth.dtype.kind in "iub":
            if not np.array_equal(candidate.astype(np.int64), variant.astype(np.int64)):
                return None
            measured = measured or name in SET_OUTPUTS or truth.dtype == np.uint8  # a whole selection or byte image matched:
            # specific, unlike a count
            continue
        to_variant, to_truth = _distance(candidate, variant), _distance(candidate, truth)
        closeness = math.inf if math.isinf(to_variant) else (to_variant / to_truth if to_truth > 0 else math.inf)
        if not (compare_tensor(name, candidate, variant, noise, profile).passed or closeness < 1 / NAMING_FACTOR):
            return None
        worst, measured = max(worst, closeness), True
    return worst if differs and measured and _keeps_passing(failed_outputs, produced, expected, case, noises, profile) else None


def _keeps_passing(failed_outputs: list[str], produced: Mapping, expected: Mapping, case: dict, noises: dict, profile: str) -> bool:
    """Whether the variant also matches the candidate on the outputs the candidate got right (a bug that would change
    them is not this candidate's)."""
    for name in [name for name in case["output"] if name in produced and name in expected and name not in failed_outputs]:
        candidate, variant = _as_compared(name, produced[name]), _as_compared(name, expected[name])
        if candidate.shape != variant.shape:
            return False
        truth = _as_compared(name, case["output"][name])
        if variant.shape == truth.shape and np.allclose(variant, truth, rtol=1e-12, atol=0.0, equal_nan=True):
            continue  # the variant leaves this output as the truth, which the candidate passed
        if variant.dtype.kind in "iub":
            if not np.array_equal(candidate.astype(np.int64), variant.astype(np.int64)):
                return False
        elif not compare_tensor(name, candidate, variant, noises.get(f"output:{name}", 0.0), profile).passed:
            return False
    return True


def _as_compared(name: str, value) -> np.ndarray:
    """``value`` as an array; a selection (SET_OUTPUTS) sorted along its last axis, since only its set is specified."""
    array = np.asarray(value)
    return np.sort(array, axis=-1) if name in SET_OUTPUTS and array.dtype.kind in "iu" and array.ndim else array


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance over the finite entries; inf where the NaN / inf positions (or the infinities) differ."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a)
    if (finite != np.isfinite(b)).any() or (~finite & (a != b) & ~(np.isnan(a) & np.isnan(b))).any():
        return math.inf
    return float(np.linalg.norm(np.where(finite, a, 0.0) - np.where(finite, b, 0.0)))
