"""GOLDEN — the golden cases of spec/golden.yaml, built from the spec by the reference.

A builder turns a case definition (preset, seed, layout) into the inputs and weights of
one adapter entry point, :func:`case_args` into its scalar arguments; :func:`build_case`
then runs the reference adapter on them for the float64 truth (with every intermediate of
the steps the case covers) and once per precision profile for the emulated outputs and the
noise scale of every tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re

import numpy as np

from ..config import ModelConfig, load_preset
from ..conformance import reference_adapter
from ..conformance.protocol import call
from ..dsa_cache import SCALE_BYTES, write_index_key_pages
from ..errors import GoldenError
from ..fp8 import BLOCK_SIZE, act_quant
from ..fp8_cache import encode_latent_record, latent_tile_scale, record_width
from ..precision import UNIT_ROUNDOFF, round_bf16
from ..rope import softmax_scale
from ..spec import load_spec_file
from ..trace import Trace, profile as trace_profile
from ..weights import generate_attention_weights, generate_weights, quantize_checkpoint_tensor, subtree, weight_shapes

CASE_ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]*(/[a-z0-9][a-z0-9_.\-]*)*$")


@dataclasses.dataclass
class Case:
    """Everything a golden case stores. ``tensors()`` names them as the case file does."""

    id: str
    definition: dict
    config: ModelConfig
    args: dict  # scalar arguments of the entry point
    inputs: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    steps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # "MLA.2/q_nope" -> array
    emulated: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    noise: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # profile -> tensor -> L2 noise
    noise_max: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # profile -> tensor -> largest |emulated - truth|
    margins: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # discrete output -> the truth's margin of each choice

    @property
    def entry_point(self) -> str:
        return self.definition["entry_point"]

    def weights_entry(self) -> dict | None:
        """The manifest's ``weights``: the recipe that rebuilds the weights and their digest; None when the file stores them."""
        recipe = weights_recipe(self.definition)
        return None if recipe is None else {**recipe, "digest": weights_digest(self.weights)}

    def tensors(self) -> dict[str, np.ndarray]:
        """What the case file holds: weights only when no recipe rebuilds them."""
        named = {f"input:{k}": v for k, v in self.inputs.items()}
        if weights_recipe(self.definition) is None:
            named.update({f"weight:{k}": v for k, v in self.weights.items()})
        named.update({f"output:{k}": v for k, v in self.outputs.items()})
        named.update({f"step:{k.replace('/', ':')}": v for k, v in self.steps.items()})
        named.update({f"margin:{k}": v for k, v in self.margins.items()})
        for profile, outputs in self.emulated.items():
            named.update({f"emulated:{profile}:{k}": v for k, v in outputs.items()})
        return named


def case_definitions(on_demand: bool = False) -> list[dict]:
    """The ``cases`` of spec/golden.yaml, ids checked: the committed ones, or with ``on_demand`` the ones built on request
    (DeepSeek-V3 shapes, too big to commit)."""
    cases = load_spec_file("golden.yaml")["cases"]
    seen = set()
    for case in cases:
        check_case_id(case["id"])
        if case["id"] in seen:
            raise GoldenError(case["id"], "duplicate case id in spec/golden.yaml", "GOLDEN.cases")
        seen.add(case["id"])
    return [case for case in cases if bool(case.get("on_demand", False)) == on_demand]


def check_case_id(case_id: str) -> None:
    """Ids are lower-case words joined by '/', never '..', never absolute: they become file names."""
    if not isinstance(case_id, str) or not CASE_ID.match(case_id) or ".." in case_id:
        raise GoldenError("case id", f"expected segments of [a-z0-9_.-] joined by '/', got {case_id!r}", "GOLDEN.cases")


def file_name(case_id: str) -> str:
    """``mla.prefill/tiny/seed0`` -> ``mla.prefill__tiny__seed0.npz``."""
    check_case_id(case_id)
    return case_id.replace("/", "__") + ".npz"


def case_config(definition: dict) -> ModelConfig:
    """The config a case runs: its preset's (or, for a user's own config, ``preset_config``'s) with the case's overrides."""
    from ..config import from_dict
    base = from_dict(definition["preset_config"]) if "preset_config" in definition else load_preset(definition["preset"])
    return base.replace(**definition.get("overrides", {}))


OWN_CONFIG_TEMPLATE = "tiny"  # the preset whose committed cases a user's own config instantiates (GOLDEN.own_config)


def own_config_definitions(name: str, values: dict) -> list[dict]:
    """GOLDEN.own_config — the committed cases of preset ``tiny`` (every entry point) for a user's config: preset ``name``,
    its values in ``preset_config``, the case's overrides, seed and layout kept, ``tiny`` in the id replaced by ``name``
    (``mtp.forward/tiny-dense/seed0`` -> ``mtp.forward/NAME-dense/seed0``)."""
    check_case_id(name)
    if "/" in name:
        raise GoldenError("config name", f"expected one id segment, got {name!r}", "GOLDEN.own_config")
    return [{**definition, "id": "/".join(part.replace(OWN_CONFIG_TEMPLATE, name, 1) if part.startswith(OWN_CONFIG_TEMPLATE) else part
                                          for part in definition["id"].split("/")),
             "preset": name, "preset_config": dict(values)}
            for definition in case_definitions() if definition["preset"] == OWN_CONFIG_TEMPLATE]


def own_config_name(config: ModelConfig) -> str:
    """A config's name as one case id segment: lower case, runs of other characters than [a-z0-9_.-] as '-' (``own`` if none left)."""
    return re.sub(r"[^a-z0-9_.\-]+", "-", config.name.lower()).strip("-.") or "own"


def folder_definitions(manifest: dict) -> list[dict]:
    """The definitions a golden folder was built from: a user's own config (manifest ``own_config``), else spec/golden.yaml's."""
    own = manifest.get("own_config")
    if own is not None:
        return own_config_definitions(own["name"], own["config"])
    return case_definitions(bool(manifest.get("on_demand", False)))


def _rng(definition: dict, purpose: str) -> np.random.Generator:
    key = f"mla-ref-golden/{definition['id']}/{purpose}"
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


# ------------------------------------------------------------------ builders: arguments of one call

def case_args(definition: dict, config: ModelConfig) -> dict:
    """The scalar arguments of a case's entry point (the manifest's ``args``), from its definition alone."""
    layout, entry_point = definition["layout"], definition["entry_point"]
    if entry_point == "latent_attention_core":
        causal = bool(layout.get("causal", layout.get("s_q", 1) > 1))
        return {"head_dim_v": config.kv_lora_rank, "softmax_scale": softmax_scale(config), "causal": causal}
    if entry_point in ("sparse_decode_core", "sparse_prefill_core"):
        return {"head_dim_v": config.kv_lora_rank, "softmax_scale": softmax_scale(config)}
    if entry_point == "mtp_forward":
        return {"mtp_lambda": layout.get("mtp_lambda", 0.3)}
    from_layout = {"index_cache_write": "scale_rule", "moe_layer": "layer", "dispatch_plan": "ranks", "greedy_decode": "steps", "speculative_decode": "steps"}
    return {from_layout[entry_point]: layout[from_layout[entry_point]]} if entry_point in from_layout else {}


def build_paged_core(definition: dict, config: ModelConfig):
    """Kernel level (MLA.17): FlashMLA layout, shuffled block table, NaN poison, a canary key past each length."""
    layout = definition["layout"]
    rng = _rng(definition, "inputs")
    seqlens = np.array(layout["seqlens"], dtype=np.int64)
    batch, s_q, block_size = len(seqlens), layout.get("s_q", 1), layout["block_size"]
    heads, width = config.num_attention_heads, config.latent_cache_width
    per_sequence = -(-(seqlens + 1) // block_size)  # room for the canary slot
    spare = layout.get("spare_blocks", 2)
    num_blocks = int(per_sequence.sum()) + spare
    order = rng.permutation(num_blocks)
    table = np.full((batch, int(per_sequence.max())), -1, dtype=np.int64)
    taken = 0
    for b in range(batch):
        table[b, : per_sequence[b]] = order[taken: taken + per_sequence[b]]
        taken += per_sequence[b]
    q = rng.standard_normal((batch, s_q, heads, width)) * layout.get("q_scale", 1.0)
    k_cache = np.full((num_blocks, block_size, 1, width), np.nan)  # unused slots and spare blocks stay NaN
    for b in range(batch):
        for t in range(int(seqlens[b])):
            k_cache[table[b, t // block_size], t % block_size, 0] = rng.standard_normal(width)
        if layout.get("canary", True):  # a large key aligned with the queries in the first slot past the length
            direction = q[b].reshape(-1, width).mean(axis=0)
            k_cache[table[b, seqlens[b] // block_size], seqlens[b] % block_size, 0] = 50.0 * direction / np.linalg.norm(direction)
    if layout.get("fp8_cache", False):
        canaries = [(table[b, seqlens[b] // block_size], seqlens[b] % block_size) for b in range(batch)]
        k_cache = fp8_record_pool(definition, config, k_cache, [table[b, 0] for b in range(batch) if seqlens[b] > 0], canaries)
    return {"q": q, "k_cache": k_cache, "block_table": table, "cache_seqlens": seqlens}, {}


def _canary_row(q: np.ndarray, width: int) -> np.ndarray:
    """A large key aligned with the mean query: attending it moves every output far from the truth."""
    direction = q.reshape(-1, width).mean(axis=0)
    return 50.0 * direction / np.linalg.norm(direction)


def _sparse_index_row(rng: np.random.Generator, candidates: np.ndarray, topk: int, invalid: np.ndarray) -> np.ndarray:
    """``topk`` entries: distinct candidates in random order with ``invalid`` values at random places."""
    row = np.empty(topk, dtype=np.int64)
    places = rng.permutation(topk)
    row[places[: len(invalid)]] = invalid
    row[places[len(invalid):]] = rng.choice(candidates, size=topk - len(invalid), replace=False)
    return row


def build_sparse_decode(definition: dict, config: ModelConfig):
    """Kernel level (DSA.13): indices in the token encoding page * block_size + offset, each sequence's rows on three
    shuffled pages, -1 padding, one query with every index -1 (layout ``empty_query``), canary keys in the first and
    the last slot (where a -1 read as row 0 or as the last row lands); with ``poison: nan`` NaN in every other unread
    slot, else finite decoys (so that a bug reading them can be named); with ``fp8_cache`` the pool as 656-byte FP8
    records (GC-FP8-CACHE's writers' scale rules, a zero tile and a saturating tile in slot 0 of a page the first
    query of the first two sequences reads)."""
    layout = definition["layout"]
    rng = _rng(definition, "inputs")
    batch, s_q, block_size, pages, topk = (layout[key] for key in ("batch", "s_q", "block_size", "pages", "topk"))
    heads, width, slots = config.num_attention_heads, config.latent_cache_width, pages * block_size
    q = rng.standard_normal((batch, s_q, heads, width))
    flat = rng.standard_normal((slots, width)) if layout.get("poison") != "nan" else np.full((slots, width), np.nan)
    indices = np.empty((batch, s_q, topk), dtype=np.int64)
    first_pages = []  # FP8: for the first two sequences a page whose slot 0 the first query reads (the zero and the saturating tile)
    for b in range(batch):
        own_pages = rng.permutation(pages)[:3]
        candidates = (own_pages[:, None] * block_size + np.arange(block_size)[None, :]).ravel()
        candidates = candidates[(candidates != 0) & (candidates != slots - 1)]  # the canary slots are never read
        for i in range(s_q):
            indices[b, i] = _sparse_index_row(rng, candidates, topk, np.full(layout["invalid"], -1))
        if layout.get("fp8_cache", False) and b < 2:
            first_pages.append(next(int(page) for page in own_pages if page != 0 and page not in first_pages))
            if first_pages[-1] * block_size not in indices[b, 0]:
                indices[b, 0, np.flatnonzero(indices[b, 0] >= 0)[0]] = first_pages[-1] * block_size
    if layout.get("empty_query", False):
        indices[-1, -1] = -1
    read = np.unique(indices[indices >= 0])
    flat[read] = rng.standard_normal((len(read), width))
    flat[0] = flat[slots - 1] = _canary_row(q, width)
    k_cache = flat.reshape(pages, block_size, 1, width)
    if layout.get("fp8_cache", False):
        k_cache = fp8_record_pool(definition, config, k_cache, first_pages, [(0, 0), (pages - 1, block_size - 1)])
    return {"q": q, "k_cache": k_cache, "indices": indices}, {}


# FlashMLA's sparse prefill tests use these out-of-range indices (facts A2.2); s_kv itself is added per case
PREFILL_INVALID = (-1, -123456, 114514, 2147483647, -2147483648)


def build_sparse_prefill(definition: dict, config: ModelConfig):
    """Kernel level (DSA.14): indices over one KV with every kind of invalid index, one query with none valid, canary
    rows at 0 and s_kv - 1 that no valid index reads (where -1 read as row 0 or as the last row lands)."""
    layout = definition["layout"]
    rng = _rng(definition, "inputs")
    s_q, s_kv, topk = layout["s_q"], layout["s_kv"], layout["topk"]
    heads, width = config.num_attention_heads, config.latent_cache_width
    q = rng.standard_normal((s_q, heads, width))
    kv = rng.standard_normal((s_kv, 1, width))
    kv[0, 0] = kv[-1, 0] = _canary_row(q, width)
    kinds = np.array(PREFILL_INVALID + (s_kv,), dtype=np.int64)
    candidates = np.arange(1, s_kv - 1)
    indices = np.stack([_sparse_index_row(rng, candidates, topk, rng.choice(kinds, size=layout["invalid"])) for _ in range(s_q)])
    indices[-1] = np.resize(kinds, topk)  # nothing to attend
    return {"q": q, "kv": kv, "indices": indices[:, None, :]}, {}


FP8_CASE_RULES = ("ue8m0", "amax", "flt_min", "ue8m0_scale_floor")  # the writers' scale rules (FP8.9), in turn per tile


def fp8_record_pool(definition: dict, config: ModelConfig, k_cache: np.ndarray, first_blocks: list, canaries: list) -> np.ndarray:
    """GC-FP8-CACHE: every finite row of a float pool as an FP8 record (FP8.10) with explicit scales, each tile's from
    one of the writers' rules in turn; latents but the canaries' scaled by 2^-6 .. 2^1 (scales span powers of two), rope parts by 2; in the first
    slot of the first held sequence an all-zero tile (scale floored by its rule, FLT_MIN for the unfloored one), in the
    first slot of the second a tile whose scale is 1.5x too small, so its largest values saturate at 448; unused
    slots hold 0x7F bytes (NaN codes, NaN scales, NaN rope)."""
    rank, rope = config.kv_lora_rank, config.qk_rope_head_dim
    rng = _rng(definition, "fp8")
    held = np.isfinite(k_cache).all(axis=-1)  # [num_blocks, block_size, 1]
    slots = np.argwhere(held)  # [rows, 3], in pool order
    canary = np.array([(int(block), int(offset)) in canaries for block, offset, _ in slots])  # [rows]
    rows = k_cache[held]  # [rows, rank + rope]
    rows[~canary, :rank] *= 2.0 ** rng.uniform(-6, 1, size=(int((~canary).sum()), 1))
    rows[~canary, rank:] *= 2.0  # the rope part weighs in the logits as much as the latent
    zero_row = int(np.flatnonzero((slots[:, 0] == first_blocks[0]) & (slots[:, 1] == 0))[0])
    rows[zero_row, BLOCK_SIZE: 2 * BLOCK_SIZE] = 0.0
    amax = np.abs(rows[:, :rank]).reshape(len(rows), -1, BLOCK_SIZE).max(axis=-1)  # [rows, tiles]
    rules = [[FP8_CASE_RULES[(row + tile) % len(FP8_CASE_RULES)] for tile in range(amax.shape[1])] for row in range(len(rows))]
    scale = np.array([[latent_tile_scale(value, "flt_min" if rule == "amax" and value == 0 else rule)
                       for value, rule in zip(row_amax, row_rules)] for row_amax, row_rules in zip(amax, rules)], dtype=np.float32)
    saturating_row = int(np.flatnonzero((slots[:, 0] == first_blocks[1]) & (slots[:, 1] == 0))[0])
    scale[saturating_row, 2] = amax[saturating_row, 2] / np.float32(448 * 1.5)
    pool = np.full(k_cache.shape[:3] + (record_width(rank, rope),), 0x7F, dtype=np.uint8)  # [num_blocks, block_size, 1, record]
    pool[held] = encode_latent_record(rows[:, :rank], rows[:, rank:], scale=scale)
    return pool


def build_fp8_cache_write(definition: dict, config: ModelConfig):
    """GC-FP8-CACHE writer (FP8.10): bf16-representable rows ``[tokens, rank + rope]`` (latents scaled by 2^-6 .. 2^1) and
    explicit float32 scales ``[tokens, rank / 128]``, each tile's from one of the writers' rules in turn, except: token 0
    tile 1 with values up to 461 x its scale (448 with or without the clamp), token 1 tile 2 up to 672 x its scale (only
    the clamp gives 448), token 2 tile 0 all zero, token 3 tile 3 at most 2^-5 x its scale (e4m3 subnormals and +-0)."""
    rank, rope = config.kv_lora_rank, config.qk_rope_head_dim
    tokens = definition["layout"]["tokens"]
    if tokens < 4:
        raise GoldenError("layout.tokens", f"expected at least 4 (one per special tile), got {tokens}", "GOLDEN.cases")
    rng = _rng(definition, "inputs")
    rows = rng.standard_normal((tokens, rank + rope))
    rows[:, :rank] *= 2.0 ** rng.uniform(-6, 1, size=(tokens, 1))
    rows[2, :BLOCK_SIZE] = 0.0
    rows = round_bf16(rows)  # [tokens, rank + rope], what a bf16 model writes
    amax = np.abs(rows[:, :rank]).reshape(tokens, -1, BLOCK_SIZE).max(axis=-1).astype(np.float32)  # [tokens, tiles]
    scales = np.array([[latent_tile_scale(value, "flt_min" if value == 0 else FP8_CASE_RULES[(token + tile) % len(FP8_CASE_RULES)])
                        for tile, value in enumerate(token_amax)] for token, token_amax in enumerate(amax)], dtype=np.float32)
    scales[0, 1] = amax[0, 1] / np.float32(461)
    scales[1, 2] = amax[1, 2] / np.float32(448 * 1.5)
    scales[3, 3] = amax[3, 3] * np.float32(32)
    return {"rows": rows, "scales": scales}, {}


INDEX_PAGE_POISON = 0xFF  # a NaN e4m3fn code, and four of them a NaN float32 scale


def build_index_cache_write(definition: dict, config: ModelConfig):
    """GC-INDEX-CACHE writer (DSA.16): bf16-representable keys ``[tokens, index_head_dim]`` (scaled by 2^-6 .. 2^4) at shuffled
    slots of pages full of 0xFF, the last token skipped (slot -1); token 0 reaches 1000 (past 448: scale > 1), token 1 is
    all zero and token 2 reaches 3e-5 (both below the 1e-4 floor), token 3 reaches 2e-5 but one value of 1 (the rest in
    e4m3's subnormals and at +-0), token 4 reaches 56 = 448 x 2^-3 (a scale that is a power of two in both rules)."""
    layout = definition["layout"]
    tokens, block_size, pages = layout["tokens"], layout["block_size"], layout["pages"]
    if tokens < 6 or tokens > pages * block_size + 1:
        raise GoldenError("layout.tokens", f"expected 6 .. pages * block_size + 1 = {pages * block_size + 1}, got {tokens}", "GOLDEN.cases")
    rng = _rng(definition, "inputs")
    keys = rng.standard_normal((tokens, config.index_head_dim)) * 2.0 ** rng.uniform(-6, 4, size=(tokens, 1))
    for token, amax in ((0, 1000.0), (2, 3e-5), (3, 2e-5), (4, 56.0)):
        keys[token] *= amax / np.abs(keys[token]).max()
    keys[1] = 0.0
    keys[3, 0] = 1.0
    slots = np.append(rng.permutation(pages * block_size)[: tokens - 1], -1)  # [tokens]
    k_cache = np.full((pages, block_size, 1, config.index_head_dim + SCALE_BYTES), INDEX_PAGE_POISON, dtype=np.uint8)
    return {"keys": round_bf16(keys), "k_cache": k_cache, "slot_mapping": slots}, {}


def build_index_logits_paged(definition: dict, config: ModelConfig):
    """GC-INDEX-LOGITS (DSA.18): queries as e4m3 codes with ue8m0 scales per (token, head) folded into signed head weights
    (``logit_weights = w * q_scale * index_head_dim^-0.5``, float32), each sequence's bf16 keys (scaled by 2^-4 .. 2^4 per token)
    written with plain scales on shuffled pages, the block table padded with -1, every slot past a context 0xFF; key 3 of
    sequence 0 holds one value that rounds to -0 (code 0x80)."""
    layout = definition["layout"]
    rng = _rng(definition, "inputs")
    lengths = np.array(layout["context_lens"], dtype=np.int64)
    next_n, block_size, pages, max_blocks = (layout[key] for key in ("next_n", "block_size", "pages", "max_blocks"))
    heads, dim, batch = config.index_n_heads, config.index_head_dim, len(lengths)
    q_codes, q_scale = act_quant(rng.standard_normal((batch, next_n, heads, dim)), "ue8m0")  # [.., dim] uint8, [.., 1] float32
    head_weights = rng.standard_normal((batch, next_n, heads)) * heads ** -0.5
    logit_weights = (head_weights * q_scale[..., 0] * dim ** -0.5).astype(np.float32).astype(np.float64)  # [batch, next_n, heads]
    blocks = -(-lengths // block_size)  # [batch]
    if blocks.sum() > pages or blocks.max() > max_blocks:
        raise GoldenError("layout.pages", f"expected room for {blocks.tolist()} blocks, got {pages} pages, max_blocks {max_blocks}", "GOLDEN.cases")
    order = rng.permutation(pages)
    table = np.full((batch, max_blocks), -1, dtype=np.int64)
    k_cache = np.full((pages, block_size, 1, dim + SCALE_BYTES), INDEX_PAGE_POISON, dtype=np.uint8)
    for b, length in enumerate(lengths):
        table[b, : blocks[b]] = order[blocks[:b].sum(): blocks[:b + 1].sum()]
        keys = rng.standard_normal((length, dim)) * 2.0 ** rng.uniform(-4, 4, size=(length, 1))
        if b == 0:
            keys[3, 5] = -1e-6 * np.abs(keys[3]).max()  # below 2^-10 x its scale: code 0x80, NaN as e4m3fnuz
        positions = np.arange(length)
        slots = table[b, positions // block_size] * block_size + positions % block_size
        k_cache = write_index_key_pages(k_cache, round_bf16(keys), slots, "plain")
    return {"q": q_codes, "k_cache": k_cache, "logit_weights": logit_weights, "context_lens": lengths, "block_table": table}, {}


def _layer_weights(definition: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    layout = definition["layout"]
    weights = attention_weights_with_gain(config, definition.get("seed", 0), layout.get("logit_gain", 1.0), layout.get("fp8", False))
    if "block_gain" in layout:
        weights = fp8_block_gain(weights, generate_attention_weights(config, seed=definition.get("seed", 0)), layout["block_gain"])
    return weights


def fp8_block_gain(checkpoint: dict[str, np.ndarray], values: dict[str, np.ndarray], gain: float) -> dict[str, np.ndarray]:
    """GC-FP8: every FP8 tensor of ``checkpoint`` re-quantised from its float64 ``values`` with row block b scaled by
    ``gain ** b``: with gain > 2 neighbouring row blocks (an edge block and the one before it included) get scales a
    power of two or more apart, so a wrong scale block never hides behind an equal one; amax / 448 scales (o_proj)
    get the mantissa 1.9."""
    designed = dict(checkpoint)
    for name in checkpoint:
        if name + "_scale_inv" in checkpoint:
            rows = np.arange(values[name].shape[0]) // 128  # each row's block
            value = values[name] * gain ** rows[:, None]
            _, scale = quantize_checkpoint_tensor(name, value)
            mantissa, _ = np.frexp(scale.astype(np.float64))  # [row blocks, column blocks], in [0.5, 1)
            if np.any(mantissa != 0.5):  # amax / 448 scales: each block's moved to mantissa 1.9 (0.95 x 2), so that a
                # scale truncated to a power of two loses half of its block (a mantissa near 1 would hide it)
                stretch = np.repeat(np.repeat(0.95 / mantissa, 128, axis=0), 128, axis=1)[: value.shape[0], : value.shape[1]]
                value = value * stretch
            designed[name], designed[name + "_scale_inv"] = quantize_checkpoint_tensor(name, value)
    return designed


def attention_weights_with_gain(config: ModelConfig, seed: int, gain: float, fp8: bool = False) -> dict[str, np.ndarray]:
    """One MLA layer's generated weights with the query and key-value up-projections scaled by ``gain`` (peaked softmax rows: GC-PREFILL);
    ``fp8``: as an FP8 checkpoint (GC-FP8: codes and scales, which take no gain)."""
    if fp8:
        if gain != 1.0:
            raise GoldenError("layout.logit_gain", f"expected 1.0 with fp8 weights (FP8 codes take no gain), got {gain}", "GOLDEN.cases")
        return generate_attention_weights(config, seed=seed, fp8=True)
    weights = generate_attention_weights(config, seed=seed)
    q_name = "q_b_proj.weight" if config.q_lora_rank else "q_proj.weight"
    weights[q_name] = weights[q_name] * gain
    weights["kv_b_proj.weight"] = weights["kv_b_proj.weight"] * gain
    return weights


def build_mla_prefill(definition: dict, config: ModelConfig):
    """Layer level (MLA.1-MLA.12): one prefill without a cache at chosen start positions."""
    layout = definition["layout"]
    starts = np.array(layout["start_positions"], dtype=np.int64)
    hidden = _rng(definition, "hidden").standard_normal((len(starts), layout["seq"], config.hidden_size))
    hidden[0, -1] *= layout.get("loud_token", 1.0)  # GC-FP8: a token whose activations dwarf the others' (per-tensor scales)
    return {"hidden": hidden, "start_positions": starts}, _layer_weights(definition, config)


def build_mla_extend(definition: dict, config: ModelConfig):
    """Layer level: new tokens after cached prefixes of different lengths (chunked prefill, decode, verification)."""
    layout = definition["layout"]
    prefixes = np.array(layout["prefix_lengths"], dtype=np.int64)
    query_lengths = np.array(layout.get("query_lengths", [layout["seq"]] * len(prefixes)), dtype=np.int64)
    weights = _layer_weights(definition, config)
    rng = _rng(definition, "hidden")
    prefix_hidden = rng.standard_normal((len(prefixes), int(prefixes.max(initial=0)), config.hidden_size))
    prefill = reference_adapter.mla_extend(config.to_dict(), weights, prefix_hidden,
                                           np.zeros((len(prefixes), 0, config.latent_cache_width)), np.zeros(len(prefixes), np.int64),
                                           prefixes)
    hidden = rng.standard_normal((len(prefixes), layout["seq"], config.hidden_size))  # padding holds random values too:
    # a padded token that leaks into the cache or the outputs must change something
    return {"hidden": hidden, "cache_rows": prefill["rows"], "cache_lengths": prefixes, "query_lengths": query_lengths}, weights


def selection_gaps(masked_scores: np.ndarray, index_topk: int) -> np.ndarray:
    """Per query ``[batch, seq]``: its k-th minus its (k+1)-th index score (DSA.9), the truth's margin of its DSA.10
    selection (TOLERANCE.4); inf for a query that sees at most k keys (it keeps them all)."""
    ranked = -np.sort(-masked_scores, axis=-1)  # [batch, seq, keys], descending, -inf last
    if ranked.shape[-1] <= index_topk:
        return np.full(ranked.shape[:2], np.inf)
    kth, next_best = ranked[..., index_topk - 1], ranked[..., index_topk]
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(next_best), kth - next_best, np.inf)


def selection_margins(masked_scores: np.ndarray, index_topk: int) -> np.ndarray:
    """Per query ``[batch, seq]``: :func:`selection_gaps` over its largest |score|; inf for a query that keeps every key."""
    scale = np.max(np.abs(np.where(np.isfinite(masked_scores), masked_scores, 0.0)), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return selection_gaps(masked_scores, index_topk) / scale


def _sequences_with_selection_margins(definition: dict, config: ModelConfig, weights: dict, lengths, starts) -> np.ndarray:
    """Hidden states ``[batch, max(lengths), hidden_size]`` built position by position (64 candidates at a time) so that
    every query's DSA selection keeps a relative margin of ``min_margin`` at the k-th score (GC-DSA), both without and
    with DSA.6's FP8 (which the fp8 profile emulates): causal, so a later token never moves an earlier query's
    selection; positions past a sequence's length are random. Layout ``tie_positions: {exact: [..], near: [..]}``
    (GC-DSA-TIES): at those positions of every sequence the query's k-th and (k+1)-th float64 scores tie exactly
    (keys scoring 0 after the ReLU) or differ by less than ``max_near_margin`` of its largest |score|.

    Only a query that sees more than ``index_topk`` keys has a selection boundary, and its scores depend on its own
    hidden state and the earlier tokens' indexer keys only (DSA.6 quantises each token's key and each (token, head)
    query on its own), so a position before ``index_topk`` takes its first candidate unscored and the keys of those
    positions are computed together when the first position that selects needs them: a sequence of index_topk = 2048
    plus a few tokens scores only the few.
    """
    from ..dsa import index_scores, indexer_query_key
    from ..mla import query_latent
    rng = _rng(definition, "hidden")
    min_margin, tries = definition["layout"].get("min_margin", 0.06), 64
    ties = definition["layout"].get("tie_positions", {})
    max_near = definition["layout"].get("max_near_margin", 0.0)
    hidden = rng.standard_normal((len(lengths), int(max(lengths)), config.hidden_size))
    for b, length in enumerate(lengths):
        keys = {}  # quantize -> the indexer keys of the positions chosen so far, [position, index_dim]
        for position in range(int(length)):
            if position < config.index_topk:  # sees at most index_topk keys and keeps them all: the first candidate of one draw
                hidden[b, position] = rng.standard_normal((tries, 1, config.hidden_size))[0, 0]
                continue
            if not keys:
                keys = _indexer_keys(config, weights, hidden[b: b + 1, :position], starts[b])
            for _ in range(definition["layout"].get("attempts", 256) // tries):
                candidates = rng.standard_normal((tries, 1, config.hidden_size))
                c_q = query_latent(candidates, weights, config.rms_norm_eps)  # MLA.1
                every_key, margins = {}, []
                for quantize in (False, True):
                    q_hat, k_hat, head_weights = indexer_query_key(config, weights, candidates, c_q, np.full((tries, 1), starts[b] + position),
                                                                   quantize)
                    every_key[quantize] = np.concatenate([np.repeat(keys[quantize][None], tries, axis=0), k_hat], axis=1)  # [tries, position + 1, index_dim]
                    margins.append(selection_margins(index_scores(q_hat, every_key[quantize], head_weights), config.index_topk)[:, 0])
                if position in ties.get("exact", []):
                    good = np.flatnonzero(margins[0] == 0)
                elif position in ties.get("near", []):
                    good = np.flatnonzero((margins[0] > 0) & (margins[0] < max_near))
                else:
                    good = np.flatnonzero(np.minimum(*margins) > min_margin)
                if good.size:
                    hidden[b, position] = candidates[good[0], 0]
                    keys = {quantize: rows[good[0]] for quantize, rows in every_key.items()}
                    break
            else:
                raise GoldenError(definition["id"], f"no hidden state keeps the DSA selection margin at position {position}", "GOLDEN.cases")
    return hidden


def _indexer_keys(config: ModelConfig, weights: dict, hidden: np.ndarray, start: int) -> dict[bool, np.ndarray]:
    """DSA.1-DSA.6 of one sequence's tokens ``hidden [1, seq, hidden_size]`` from position ``start``: their indexer keys
    ``[seq, index_dim]`` without and with FP8 (key True)."""
    from ..dsa import indexer_query_key
    from ..mla import query_latent
    c_q = query_latent(hidden, weights, config.rms_norm_eps)  # MLA.1
    positions = start + np.arange(hidden.shape[1])[None, :]  # [1, seq]
    return {quantize: indexer_query_key(config, weights, hidden, c_q, positions, quantize)[1][0] for quantize in (False, True)}


def _check_selection_stable(definition: dict, config: ModelConfig, weights: dict, inputs: dict) -> dict:
    """``inputs``, after checking that every profile's emulation selects the keys the float64 truth selects (DSA.10);
    a case with designed ties (GC-DSA-TIES) is judged by margin instead (TOLERANCE.4) and not checked."""
    if "tie_positions" in definition["layout"]:
        return inputs
    probe = Case(definition["id"], definition, config, case_args(definition, config), inputs, weights)
    truth = np.sort(call_reference(probe, None)["indices"], axis=-1)  # the set is specified, not the order
    for profile in profiles_of(definition):
        if not np.array_equal(np.sort(call_reference(probe, Trace(profile, keep=False))["indices"], axis=-1), truth):
            raise GoldenError(definition["id"], f"the {profile} emulation changes the DSA selection: raise min_margin", "GOLDEN.cases")
    return inputs


def build_dsa_layer(definition: dict, config: ModelConfig):
    """Layer level (DSA.1-DSA.10, with the sparse layer for dsa_prefill): one batch without a cache, every selection with a margin."""
    layout = definition["layout"]
    starts = np.array(layout["start_positions"], dtype=np.int64)
    weights = _layer_weights(definition, config)
    hidden = _sequences_with_selection_margins(definition, config, weights, [layout["seq"]] * len(starts), starts)
    return _check_selection_stable(definition, config, weights, {"hidden": hidden, "start_positions": starts}), weights


def build_dsa_extend(definition: dict, config: ModelConfig):
    """Layer level: a DSA layer after cached prefixes (latent rows and indexer keys), every selection with a margin."""
    layout = definition["layout"]
    prefixes = np.array(layout["prefix_lengths"], dtype=np.int64)
    query_lengths = np.array(layout.get("query_lengths", [layout["seq"]] * len(prefixes)), dtype=np.int64)
    weights = _layer_weights(definition, config)
    batch, seq = len(prefixes), layout["seq"]
    whole = _sequences_with_selection_margins(definition, config, weights, prefixes + query_lengths, np.zeros(batch, np.int64))
    prefix_hidden = np.zeros((batch, int(prefixes.max(initial=0)), config.hidden_size))
    hidden = _rng(definition, "padding").standard_normal((batch, seq, config.hidden_size))  # padding holds random values too
    for b in range(batch):
        prefix_hidden[b, : prefixes[b]] = whole[b, : prefixes[b]]
        hidden[b, : query_lengths[b]] = whole[b, prefixes[b]: prefixes[b] + query_lengths[b]]
    cache_rows, index_key_rows = _cached_rows(config, weights, prefix_hidden, prefixes)
    inputs = {"hidden": hidden, "cache_rows": cache_rows, "index_key_rows": index_key_rows, "cache_lengths": prefixes,
              "query_lengths": query_lengths}
    return _check_selection_stable(definition, config, weights, inputs), weights


def _cached_rows(config: ModelConfig, weights: dict, hidden: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a DSA layer caches for the prefix tokens ``hidden [batch, seq, hidden_size]`` at positions 0.. (MLA.18, DSA.7):
    latent rows ``[batch, seq, latent_cache_width]`` (MLA.3-MLA.5) and indexer keys ``[batch, seq, index_dim]`` (DSA.1-DSA.6,
    float64), 0 past each sequence's length. Without the prefix's own attention, which no output of the case reads: at
    V3.2 shapes that prefill of 2048 queries over 2048 selected rows costs minutes."""
    from ..dsa import indexer_query_key
    from ..mla import kv_latent_and_rope_key, latent_cache_rows, query_latent, rotate_query_key
    batch, seq, _ = hidden.shape
    positions = np.broadcast_to(np.arange(seq), (batch, seq))
    kv_latent, k_pe = kv_latent_and_rope_key(config, hidden, weights)  # MLA.3: [batch, seq, kv_lora_rank], [batch, seq, rope]
    no_query = np.zeros((batch, seq, 0, config.qk_rope_head_dim))  # MLA.4 rotates the cached key only
    rows = latent_cache_rows(kv_latent, rotate_query_key(config, no_query, k_pe, positions)[1])  # MLA.5
    index_keys = indexer_query_key(config, weights, hidden, query_latent(hidden, weights, config.rms_norm_eps), positions)[1]
    written = (np.arange(seq)[None, :] < lengths[:, None])[..., None]  # [batch, seq, 1]
    return np.where(written, rows, 0.0), np.where(written, index_keys, 0.0)


def _gate_weights(definition: dict, config: ModelConfig, layer: int, experts: bool = True) -> dict[str, np.ndarray]:
    """The ``mlp.`` tensors of ``layer`` (tiny presets: every expert; ``experts=False``: the router's only), the bias
    shifted by ``bias_shift``. Built by name: a V3 layer's 256 experts are never generated for a router case."""
    prefix = f"model.layers.{layer}.mlp." + ("" if experts else "gate.")
    names = [name for name in weight_shapes(config) if name.startswith(prefix)]
    fp8 = definition["layout"].get("fp8", False)  # GC-FP8: the experts as an FP8 checkpoint stores them (the gate is kept)
    weights = subtree(generate_weights(config, seed=definition.get("seed", 0), names=names, fp8=fp8), f"model.layers.{layer}.")
    if "block_gain" in definition["layout"]:
        values = subtree(generate_weights(config, seed=definition.get("seed", 0), names=names), f"model.layers.{layer}.")
        weights = fp8_block_gain(weights, values, definition["layout"]["block_gain"])
    shift = definition["layout"].get("bias_shift")
    if shift is not None and "mlp.gate.e_score_correction_bias" in weights:
        weights["mlp.gate.e_score_correction_bias"] = weights["mlp.gate.e_score_correction_bias"] + shift
    return weights


def _routing_differs(config: ModelConfig, weights: dict, hidden: np.ndarray, reference_ids: np.ndarray, requirement: str) -> np.ndarray:
    """Per token: does routing under one well-known bug choose another expert set? (GC-MOE-V3 designed rows)."""
    from ..moe import route
    if requirement == "bias_changes_selection":
        variant, variant_weights = config, dict(weights, **{"mlp.gate.e_score_correction_bias": np.zeros(config.n_routed_experts)})
    elif requirement == "group_rule_matters":
        variant, variant_weights = config.replace(group_score_rule="max" if config.group_rule == "top2_sum" else "top2_sum"), weights
    elif requirement == "zero_fill_matters":
        variant, variant_weights = config.replace(group_mask_fill="zero"), weights
    else:
        raise GoldenError("layout.require", f"unknown requirement {requirement!r}", "GOLDEN.cases")
    other = route(variant, variant_weights, hidden).expert_ids
    return np.any(np.sort(other, axis=-1) != np.sort(reference_ids, axis=-1), axis=-1)


def _tokens_with_margins(definition: dict, config: ModelConfig, weights: dict, count: int) -> np.ndarray:
    """Random tokens whose expert and group margins exceed ``min_margin`` (routing far from any tie).

    ``layout.require`` lists bugs that must change the routing of at least ``per_requirement``
    of the chosen tokens (bias_changes_selection, group_rule_matters, zero_fill_matters).
    """
    from ..moe import route
    rng = _rng(definition, "hidden")
    layout = definition["layout"]
    minimum, scale = layout.get("min_margin", 0.0), layout.get("hidden_scale", 1.0)
    pool = rng.standard_normal((64 * count, config.hidden_size)) * scale
    routing = route(config, weights, pool)
    good = (routing.expert_margin > minimum) & (routing.group_margin > minimum)
    chosen: list[int] = []
    for requirement in layout.get("require", []):
        differs = _routing_differs(config, weights, pool, routing.expert_ids, requirement) & good
        picked = [int(i) for i in np.flatnonzero(differs) if i not in chosen][: layout.get("per_requirement", 3)]
        if len(picked) < layout.get("per_requirement", 3):
            raise GoldenError(definition["id"], f"too few tokens where {requirement} (found {len(picked)})", "GOLDEN.cases")
        chosen += picked
    near = layout.get("near_ties", 0)  # tokens whose K-th and (K+1)-th experts are within max_near_margin
    if near:
        close = np.flatnonzero((routing.expert_margin < layout["max_near_margin"]) & (routing.group_margin > minimum))
        if close.size < near:
            raise GoldenError(definition["id"], f"too few near-tie tokens (found {close.size})", "GOLDEN.cases")
        chosen += [int(i) for i in close[:near]]
    chosen += [int(i) for i in np.flatnonzero(good) if i not in chosen][: count - len(chosen)]
    if len(chosen) < count:
        raise GoldenError(definition["id"], f"could not find {count} tokens with routing margins > {minimum}", "GOLDEN.cases")
    return pool[np.sort(chosen)]


def build_moe_route(definition: dict, config: ModelConfig):
    """MOE.1-MOE.8 on tokens with routing margins above the profiles' noise, or with designed exact ties."""
    layout = definition["layout"]
    weights = _gate_weights(definition, config, layout["layer"], experts=False)
    if layout.get("ties"):
        weights, hidden = _tied_router(definition, config, weights)
    else:
        hidden = _tokens_with_margins(definition, config, weights, layout["tokens"])
    return {"hidden": hidden}, weights


def _tied_router(definition: dict, config: ModelConfig, weights: dict):
    """GC-MOE-TIES: duplicated gate rows give bit-identical scores — a tie inside a group, at the expert cut, and between groups."""
    per_group = config.n_routed_experts // config.n_group
    gate = weights["mlp.gate.weight"].copy()
    gate[1] = gate[0]  # a duplicated maximum inside group 0
    gate[per_group: 2 * per_group] = gate[2 * per_group: 3 * per_group]  # groups 1 and 2 tie exactly
    gate *= 3.0  # spread the scores so the duplicated experts lead
    weights = dict(weights, **{"mlp.gate.weight": gate})
    if "mlp.gate.e_score_correction_bias" in weights:
        bias = weights["mlp.gate.e_score_correction_bias"].copy()
        bias[1] = bias[0]
        bias[per_group: 2 * per_group] = bias[2 * per_group: 3 * per_group]
        weights["mlp.gate.e_score_correction_bias"] = bias
    hidden = _rng(definition, "hidden").standard_normal((definition["layout"]["tokens"], config.hidden_size))
    hidden[0] = gate[0] / np.linalg.norm(gate[0]) * 4.0  # token 0 leans on experts 0 and 1
    return weights, hidden


def build_moe_layer(definition: dict, config: ModelConfig):
    """MOE.1-MOE.13 on one layer: the routed experts the tokens need, the shared experts, or the dense MLP."""
    layout = definition["layout"]
    layer = layout["layer"]
    weights = _gate_weights(definition, config, layer)
    if config.is_moe_layer(layer):
        hidden = _tokens_with_margins(definition, config, weights, layout["tokens"])
    else:
        hidden = _rng(definition, "hidden").standard_normal((layout["tokens"], config.hidden_size))
    return {"hidden": hidden}, weights


def build_moe_balance(definition: dict, config: ModelConfig):
    """MOE.14-MOE.17 on routing decisions of whole sequences: load, bias update, balance losses."""
    from ..moe import route
    layout = definition["layout"]
    weights = _gate_weights(definition, config, layout["layer"], experts=False)
    batch, seq = layout["batch"], layout["seq"]
    hidden = _rng(definition, "hidden").standard_normal((batch * seq, config.hidden_size))
    routing = route(config, weights, hidden)
    inputs = {"scores": routing.scores.reshape(batch, seq, -1), "expert_ids": routing.expert_ids.reshape(batch, seq, -1),
              "bias": weights["mlp.gate.e_score_correction_bias"]}
    return inputs, {}


def build_dispatch_plan(definition: dict, config: ModelConfig):
    """MOE.18 on the routing decisions of random tokens."""
    from ..moe import route
    layout = definition["layout"]
    weights = _gate_weights(definition, config, layout["layer"], experts=False)
    hidden = _rng(definition, "hidden").standard_normal((layout["tokens"], config.hidden_size))
    return {"expert_ids": route(config, weights, hidden).expert_ids}, {}


class MarginTrace(Trace):
    """A trace that keeps every routing margin of a run, layer after layer (MOE.5 group and MOE.7 expert margins), and
    with ``index_topk`` every DSA selection margin (:func:`selection_margins`)."""

    def __init__(self, index_topk: int | None = None) -> None:
        super().__init__()
        self.margins: list[np.ndarray] = []
        self.selection_margins: list[np.ndarray] = []
        self.index_topk = index_topk

    def record(self, step_id: str, **arrays: np.ndarray) -> None:
        super().record(step_id, **arrays)
        for name in ("group_margin", "expert_margin"):
            if name in arrays:
                self.margins.append(np.asarray(arrays[name]))
        if step_id == "DSA.9" and self.index_topk is not None:  # every layer's DSA selection margins (GC-DSA)
            self.selection_margins.append(selection_margins(arrays["masked_scores"], self.index_topk))


def _token_with_margins(definition: dict, config: ModelConfig, weights: dict, prefix: np.ndarray, candidates: np.ndarray) -> int:
    """The first candidate token after ``prefix`` whose routing at every MoE layer keeps ``min_margin`` and whose DSA selection at
    every layer keeps ``selection_margin`` (default 0.06, relative: :func:`selection_margins`), tried 16 at a time."""
    from ..model import model_forward
    for start in range(0, len(candidates), 16):
        batch = candidates[start: start + 16]
        trial = np.concatenate([np.repeat(prefix[None, :], len(batch), axis=0), batch[:, None]], axis=1)
        trace = MarginTrace(config.index_topk)
        model_forward(config, weights, trial, trace=trace)
        keeps = np.ones(len(batch), bool)
        for margins, least in ((trace.margins, definition["layout"]["min_margin"]),
                               (trace.selection_margins, definition["layout"].get("selection_margin", 0.06))):
            for margin in margins:
                keeps &= margin.reshape(len(batch), -1)[:, -1] > least
        good = np.flatnonzero(keeps)
        if good.size:
            return int(batch[good[0]])
    raise GoldenError(definition["id"], f"no token keeps the routing margins at position {len(prefix)}", "GOLDEN.cases")


def build_model_logits(definition: dict, config: ModelConfig):
    """Model level: token sequences built position by position so that every MoE routing at every layer has a margin."""
    layout = definition["layout"]
    weights = model_weights(definition, config)
    rng = _rng(definition, "tokens")
    lengths = np.array(layout["lengths"], dtype=np.int64)
    tokens = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    for b, length in enumerate(lengths):
        for position in range(int(length)):
            tokens[b, position] = _token_with_margins(definition, config, weights, tokens[b, :position], rng.permutation(config.vocab_size))
    return {"tokens": tokens, "query_lengths": lengths}, weights


def _keeps_selection_margins(definition: dict, config: ModelConfig, weights: dict, sequence: np.ndarray) -> bool:
    """GC-DSA: every layer's DSA selection at every position of ``sequence`` keeps the relative margin ``selection_margin``
    (default 0.06, :func:`selection_margins`) at the k-th score, so that no tie rule and no profile changes a selected set."""
    from ..model import model_forward
    trace = MarginTrace(config.index_topk)
    model_forward(config, weights, sequence[None], trace=trace)
    least = definition["layout"].get("selection_margin", 0.06)
    return all(bool((margin > least).all()) for margin in trace.selection_margins)


def _stable_prompts(definition: dict, config: ModelConfig, weights: dict, args: dict):
    """Prompts whose discrete outcome (tokens, acceptance) is the same in float64 and in every profile's emulation; for
    a DSA greedy decode, whose every DSA selection (the prompt and the generated tokens fed back) keeps a margin too, and
    with layout ``token_margin`` whose every greedy token leads the next best logit by more than it."""
    layout = definition["layout"]
    rng = _rng(definition, "prompts")
    lengths = np.array(layout["prompt_lengths"], dtype=np.int64)
    chosen = []
    for _ in range(layout.get("attempts", 40)):
        prompt = rng.integers(0, config.vocab_size, int(lengths.max()))
        inputs = {"prompt_tokens": prompt[None, :], "prompt_lengths": lengths[len(chosen): len(chosen) + 1]}
        probe = Case(definition["id"], definition, config, args, inputs, weights)
        truth = call_reference(probe, None)
        if "token_margin" in layout and logit_margins(truth["logits"]).min() <= layout["token_margin"]:
            continue
        if config.sparse_attention and "tokens" in truth:
            fed_back = np.concatenate([prompt[: lengths[len(chosen)]], truth["tokens"][0, :-1]])
            if not _keeps_selection_margins(definition, config, weights, fed_back):
                continue
        outcomes = [call_reference(probe, Trace(profile, keep=False)) for profile in profiles_of(definition) if profile != "fp64"]
        if all(np.array_equal(truth[name], outcome[name]) for outcome in outcomes for name in truth if truth[name].dtype.kind in "iu"):
            chosen.append(prompt)
            if len(chosen) == len(lengths):
                return {"prompt_tokens": np.array(chosen), "prompt_lengths": lengths}
    raise GoldenError(definition["id"], "no prompt with the same discrete outcome under every profile", "GOLDEN.cases")


def build_greedy_decode(definition: dict, config: ModelConfig):
    """Model level: cached greedy steps from ragged prompts whose greedy tokens no precision profile changes."""
    weights = model_weights(definition, config)
    return _stable_prompts(definition, config, weights, case_args(definition, config)), weights


def build_mtp_forward(definition: dict, config: ModelConfig):
    """Model level: the main model and the MTP chain on random token sequences (MTP.1-MTP.6)."""
    layout = definition["layout"]
    weights = model_weights(definition, config)
    tokens = _rng(definition, "tokens").integers(0, config.vocab_size, (layout["batch"], layout["seq"] + 1))
    return {"tokens": tokens}, weights


def weights_recipe(definition: dict) -> dict | None:
    """How a case's weights are rebuilt instead of stored (GOLDEN storage): model-level cases (the generator's seed and
    design) and on-demand MLA layers (seed and logit gain); None for the others, which store their weights."""
    layout = definition["layout"]
    seed = int(definition.get("seed", 0))
    if definition["level"] == "model":
        recipe = {"generator": "mla_ref.weights.generate_weights", "seed": seed, "design": layout.get("designed", "none")}
        if recipe["design"] == "echo":
            recipe["block_scale"] = float(layout["block_scale"])
        if recipe["design"] in SPREAD_NORMS:
            recipe["norm_spread"] = float(layout["norm_spread"])
        return recipe
    if definition.get("on_demand") and definition["entry_point"] in ("mla_prefill", "mla_extend", "dsa_indexer", "dsa_prefill", "dsa_extend"):
        recipe = {"generator": "mla_ref.weights.generate_attention_weights", "seed": seed, "design": "logit_gain",
                  "logit_gain": float(layout.get("logit_gain", 1.0))}
        if layout.get("fp8"):
            recipe["fp8"] = True
        return recipe
    return None


def rebuild_weights(config: ModelConfig, recipe: dict) -> dict[str, np.ndarray]:
    """The weights a recipe describes: the generator's, reshaped by the design (``echo``, ``logit_gain``) if any."""
    if recipe["design"] == "echo":
        return echo_weights(config, recipe["seed"], recipe["block_scale"])
    if recipe["design"] == "logit_gain":
        return attention_weights_with_gain(config, recipe["seed"], recipe["logit_gain"], recipe.get("fp8", False))
    if recipe["design"] in SPREAD_NORMS:
        return norm_spread_weights(config, recipe["seed"], recipe["norm_spread"], SPREAD_NORMS[recipe["design"]])
    if recipe["design"] != "none":
        raise GoldenError("weights.design", "expected none, echo, logit_gain, final_norm_spread or mtp_norm_spread, "
                          f"got {recipe['design']!r}", "GOLDEN.storage")
    return generate_weights(config, seed=recipe["seed"])


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """One sha256 over every tensor's name and content: the manifest's check of rebuilt weights."""
    from .storage import tensor_digest
    text = "\n".join(f"{name}:{tensor_digest(weights[name])}" for name in sorted(weights))
    return hashlib.sha256(text.encode()).hexdigest()


def stored_recipe_weights(entry: dict) -> dict[str, np.ndarray]:
    """The weights of a manifest entry's recipe, checked against its digest (GoldenError if the generator changed)."""
    return dict(_recipe_weights(json.dumps(entry["config"], sort_keys=True), json.dumps(entry["weights"], sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _recipe_weights(config_json: str, recipe_json: str) -> dict[str, np.ndarray]:
    from ..config import from_dict
    recipe = json.loads(recipe_json)
    weights = rebuild_weights(from_dict(json.loads(config_json)), recipe)
    if weights_digest(weights) != recipe["digest"]:
        raise GoldenError("weights", f"rebuilt by {recipe['generator']} (seed {recipe['seed']}, design {recipe['design']}) they differ "
                          "from the manifest's digest: the weight generator changed, regenerate the golden cases", "GOLDEN.storage")
    return weights


def model_weights(definition: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """The weights of a model-level case, from its recipe."""
    return rebuild_weights(config, weights_recipe(definition))


def echo_weights(config: ModelConfig, seed: int, block_scale: float) -> dict[str, np.ndarray]:
    """Designed weights under which MTP drafts get accepted: the residual stream's token predicts a fixed successor.

    ``lm_head.weight`` is the embedding with its rows permuted (row succ(t) = Emb(t)), so a hidden
    state close to Emb(t) predicts succ(t); every block output projection (o_proj, down_proj) and
    the hidden half of eh_proj are scaled by ``block_scale``, and the embedding half of eh_proj is
    the identity, so the MTP module's row for Emb(t_{i+k}) also predicts succ(t_{i+k}). How far the
    context moves the main model off the successor map is set by ``block_scale``.
    """
    weights = generate_weights(config, seed=seed)
    embedding = weights["model.embed_tokens.weight"]  # [vocab_size, hidden_size]
    successor = np.random.default_rng(seed).permutation(config.vocab_size)  # succ(t) = successor[t]
    weights["lm_head.weight"] = embedding[np.argsort(successor)]  # row v = Emb(succ^-1(v))
    hidden = config.hidden_size
    for name, value in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = value * block_scale
        elif name.endswith("eh_proj.weight"):  # [hidden_size, 2 * hidden_size], embedding half first
            weights[name] = np.concatenate([np.eye(hidden), value[:, hidden:] * block_scale], axis=1)
    return weights


SPREAD_NORMS = {  # design -> the RMSNorm weights it spreads (names ending so)
    "final_norm_spread": ("model.norm.weight",),
    "mtp_norm_spread": ("hnorm.weight", "enorm.weight"),
}


def norm_spread_weights(config: ModelConfig, seed: int, spread: float, norms: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Generated weights with the RMSNorm weights named ``*norms`` spread ``spread`` times further from 1
    (1 + 0.1 z becomes 1 + 0.1 spread z).

    Near 1 a norm's weight hides the bugs that skip or misplace that norm under bf16 noise; spread,
    they show. final_norm_spread (model.norm): MTP's hnorm re-normalises whatever hidden state it
    gets, so h^0 taken before model.norm (MTP.1) differs from the right one only through the final
    norm's weights. mtp_norm_spread (every MTP module's hnorm and enorm, MTP.2): a skipped hnorm or
    enorm, or the two swapped, differ from the right module mostly through those weights.
    """
    weights = generate_weights(config, seed=seed)
    for name in [name for name in weights if name.endswith(norms)]:
        weights[name] = 1.0 + spread * (weights[name] - 1.0)  # [hidden_size]
    return weights


def build_mtp_draft(definition: dict, config: ModelConfig):
    """Model level: one MTP drafting step (MTP.7) from known tokens whose drafts no profile changes."""
    weights = model_weights(definition, config)
    return _stable_prompts(definition, config, weights, case_args(definition, config)), weights


def build_speculative_decode(definition: dict, config: ModelConfig):
    """Model level: speculative decoding with the MTP drafter from prompts whose outcome no profile changes."""
    weights = model_weights(definition, config)
    return _stable_prompts(definition, config, weights, case_args(definition, config)), weights


BUILDERS = {"latent_attention_core": build_paged_core, "sparse_decode_core": build_sparse_decode,
            "sparse_prefill_core": build_sparse_prefill, "fp8_cache_write": build_fp8_cache_write,
            "index_cache_write": build_index_cache_write, "index_logits_paged": build_index_logits_paged, "mla_prefill": build_mla_prefill, "mla_extend": build_mla_extend,
            "dsa_indexer": build_dsa_layer, "dsa_prefill": build_dsa_layer, "dsa_extend": build_dsa_extend,
            "moe_route": build_moe_route, "moe_layer": build_moe_layer, "moe_balance": build_moe_balance,
            "dispatch_plan": build_dispatch_plan, "model_logits": build_model_logits, "greedy_decode": build_greedy_decode,
            "mtp_forward": build_mtp_forward, "mtp_draft": build_mtp_draft, "speculative_decode": build_speculative_decode}


# ------------------------------------------------------------------ running the reference


def call_reference(case: Case, trace: Trace | None) -> dict[str, np.ndarray]:
    """Run the reference adapter's entry point on the case (in float64, or emulating the trace's profile)."""
    function = getattr(reference_adapter, case.entry_point)
    kwargs = dict(case.args)
    if "attention" in case.definition.get("layout", {}):
        kwargs["attention"] = case.definition["layout"]["attention"]
    if "expert_ids" in case.outputs and trace is not None and trace.precision is not None:
        kwargs["forced_expert_ids"] = case.outputs["expert_ids"]  # emulate rounding, not a flip of a near tie (TOLERANCE.4)
    if "indices" in case.outputs and trace is not None and trace.precision is not None:
        kwargs["forced_indices"] = case.outputs["indices"]  # likewise for a DSA selection
    available = {**case.inputs, **case.args, "config": case.config.to_dict(), "weights": case.weights}
    extra = {name: value for name, value in kwargs.items() if name not in case.args}
    return call(function, case.entry_point, available, **extra, trace=trace)


def choice_margins(case: Case, trace: Trace) -> dict[str, np.ndarray]:
    """GOLDEN margins — the truth's margin of each discrete choice a case's outputs make (TOLERANCE.4): per token the
    MOE.7 expert margin and the MOE.5 group margin of the routing, per greedy step or MTP draft the gap between the
    chosen token's logit and the next best, per query of a DSA layer its k-th index score minus the (k+1)-th."""
    if "expert_ids" in case.outputs and "MOE.7" in trace:
        return {"expert_ids": trace["MOE.7"]["expert_margin"], "groups": trace["MOE.5"]["group_margin"]}
    if "indices" in case.outputs and "DSA.9" in trace:
        return {"indices": selection_gaps(trace["DSA.9"]["masked_scores"], case.config.index_topk)}
    chosen = {"greedy_decode": "tokens", "mtp_draft": "drafts"}.get(case.entry_point)
    if chosen is None:
        return {}
    return {chosen: logit_margins(case.outputs["logits"])}


def logit_margins(logits: np.ndarray) -> np.ndarray:
    """The gap between the largest logit and the next, ``[...]`` from ``logits [..., vocab_size]``."""
    best_two = np.sort(logits, axis=-1)[..., -2:]  # [..., 2]
    return best_two[..., 1] - best_two[..., 0]


def profiles_of(definition: dict) -> list[str]:
    return definition.get("profiles", ["fp64", "fp32", "tf32", "bf16", "fp16"])


def build_case(definition: dict) -> Case:
    """GOLDEN — arguments, float64 truth with intermediates, and per-profile emulation of one case."""
    config = case_config(definition)
    inputs, weights = BUILDERS[definition["entry_point"]](definition, config)
    return evaluate_case(Case(definition["id"], definition, config, case_args(definition, config), inputs, weights))


def evaluate_case(case: Case) -> Case:
    """GOLDEN — the float64 truth of a case's inputs with the intermediates of its ``steps`` (all of them when the
    definition lists none), its choice margins, and per profile of ``profiles`` the emulated outputs and noise.

    One computation for the golden cases and for a user's own inputs (mla_ref.conformance.own_inputs).
    """
    definition = case.definition
    trace = Trace()
    case.outputs = {name: np.asarray(value) for name, value in call_reference(case, trace).items()}
    case.margins = choice_margins(case, trace)
    covered = set(definition.get("steps") or trace.steps)
    case.steps = {f"{step}/{name}": value for step, arrays in trace.steps.items() if step in covered for name, value in arrays.items()}
    for profile in profiles_of(definition):
        emulation = Trace(profile)
        emulated = call_reference(case, emulation)
        case.emulated[profile] = {name: np.asarray(value, dtype=np.float64) for name, value in emulated.items()
                                  if np.asarray(value).dtype.kind == "f"}
        pairs = {f"output:{name}": (value, case.outputs[name]) for name, value in case.emulated[profile].items()}
        for key, truth in case.steps.items():
            step, name = key.split("/")
            if step in emulation.steps and name in emulation[step] and truth.dtype.kind == "f":
                pairs[f"step:{step}:{name}"] = (emulation[step][name], truth)
        case.noise[profile] = {name: noise_l2(*pair) for name, pair in pairs.items()}
        case.noise_max[profile] = {name: noise_largest(*pair) for name, pair in pairs.items()}
    for profile in profiles_of(definition):
        apply_noise_from(case.id, profile, case.noise, case.noise_max)
    return case


def apply_noise_from(case_id: str, profile: str, noise: dict[str, dict[str, float]], noise_max: dict[str, dict[str, float]]) -> None:
    """TOLERANCE.2 ``noise_from`` — a profile whose emulation is exact (fp64) records, per tensor, the larger of its own
    noise and another profile's scaled by the ratio of their unit roundoffs: its allowance then follows how the case
    amplifies rounding (an angle at position p carries p x ulp(freq) whichever equivalent formula built it).

    ``noise`` and ``noise_max`` map profile -> tensor -> value; ``noise[profile]`` and ``noise_max[profile]`` are updated.
    """
    source = trace_profile(profile).get("noise_from")
    if source is None or profile not in noise:
        return
    if source.get("scale") != "unit_roundoff_ratio" or source.get("profile") not in noise:
        raise GoldenError(case_id, f"profile {profile}: noise_from {source} needs scale unit_roundoff_ratio and a profile "
                          f"the case emulates ({sorted(noise)})", "TOLERANCE.2")
    ratio = UNIT_ROUNDOFF[trace_profile(profile)["storage"]] / UNIT_ROUNDOFF[trace_profile(source["profile"])["storage"]]
    for recorded in (noise, noise_max):
        scaled = recorded[source["profile"]]
        recorded[profile] = {name: max(value, ratio * scaled.get(name, 0.0)) for name, value in recorded[profile].items()}


def noise_largest(emulated: np.ndarray, truth: np.ndarray) -> float:
    """The largest |emulated - truth| over the positions finite in both (a manifest's ``noise_max``)."""
    finite = np.isfinite(truth) & np.isfinite(emulated)
    return float(np.max(np.abs(np.where(finite, emulated, 0.0) - np.where(finite, truth, 0.0)), initial=0.0))


def noise_l2(emulated: np.ndarray, truth: np.ndarray) -> float:
    """||emulated - truth||_2 over the positions finite in both (a manifest's ``noise``)."""
    finite = np.isfinite(truth) & np.isfinite(emulated)
    return float(np.linalg.norm(np.where(finite, emulated, 0.0) - np.where(finite, truth, 0.0)))
