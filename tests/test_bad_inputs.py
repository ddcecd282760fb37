"""The catalogue of bad inputs (issue 14): every one gives its typed error naming the field, and writes nothing.

Each scenario is ``(id, error type, field pattern, setup)``: ``setup(folder)`` prepares files in
``folder`` and returns the action; the test runs it, checks the error's type and that its
``what`` (the field, tensor or file it names) matches the pattern, and that ``folder`` is exactly
as ``setup`` left it (no file written, changed or removed).
"""

from __future__ import annotations

import functools
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mla_ref.cache import LatentCache, NaiveCache, PagedLatentCache
from mla_ref.checks import set_memory_limit
from mla_ref.cli import main
from mla_ref.config import load_config, load_preset
from mla_ref.errors import CacheError, ConfigError, GoldenError, InputError, NumericError, ResourceError, SpecError, WeightError
from mla_ref.golden.generate import export, generate
from mla_ref.golden.manifest import read_manifest
from mla_ref.golden.storage import read_npz, read_safetensors, write_npz, write_safetensors
from mla_ref.mla import latent_attention_core, mla_forward
from mla_ref.model import model_forward
from mla_ref.moe import route
from mla_ref.spec import read_yaml
from mla_ref.weights import generate_attention_weights, generate_weights, weight_shapes

DATA = Path(__file__).parent / "data" / "configs"
HF_V3 = json.loads((DATA / "deepseek-v3.hf4.json").read_text())
HF_V3_T5 = json.loads((DATA / "deepseek-v3.hf5.json").read_text())
OFFICIAL = json.loads((DATA / "official.config_671B.json").read_text())
TINY = load_preset("tiny")
SCENARIOS: list = []


def scenario(name: str, error: type, field: str, setup) -> None:
    SCENARIOS.append(pytest.param(error, field, setup, id=name))


def call(action, *args, **kwargs):
    """A setup that prepares nothing and returns ``action(*args, **kwargs)`` to run."""
    return lambda folder: lambda: action(*args, **kwargs)


def own(**changes) -> dict:
    return {**load_preset("tiny-yarn").to_dict(), **changes}


def hf(**changes) -> dict:
    return {**HF_V3, **changes}


def in_file(name: str, content: bytes | str, action):
    """A setup writing ``content`` to ``folder/name``, returning ``action(path)``."""
    def setup(folder: Path):
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return lambda: action(path)
    return setup


YAML_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))

# ----------------------------------------------------------------------------- configs: format and keys
scenario("own-misspelled-key", ConfigError, r"^n_grup$", call(load_config, own(n_grup=4)))
scenario("own-misspelled-key-yaml", ConfigError, r"^rope_factr$", in_file("mine.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in own(rope_factr=4).items()), load_config))
scenario("own-unknown-key-with-name", ConfigError, r"^hidden$", call(load_config, own(hidden=64)))
scenario("mixed-formats", ConfigError, r"^config$", call(load_config, own(rope_scaling={"type": "yarn", "factor": 4})))
scenario("unknown-format-argument", ConfigError, r"^format$", call(load_config, HF_V3, format="json"))
scenario("hf-unknown-key-strict", ConfigError, r"^topk_methd$", call(load_config, hf(topk_methd="noaux_tc"), strict=True))
scenario("hf-unknown-rope-key-strict", ConfigError, r"^rope_scaling\.factr$",
         call(load_config, hf(rope_scaling={**HF_V3["rope_scaling"], "factr": 4}), strict=True))
scenario("hf-unknown-key-cli", SystemExit, r"^2$", lambda folder: _cli(folder, "config.json", json.dumps(hf(n_grup=8))))
scenario("hf-no-model-type-no-topk-method", ConfigError, r"^topk_method$",
         call(load_config, {k: v for k, v in HF_V3.items() if k not in ("model_type", "topk_method")}, format="hf"))
scenario("hf-model-type-unknown", ConfigError, r"^model_type$", call(load_config, hf(model_type="llama")))
scenario("official-unknown-key-strict", ConfigError, r"^n_expert_group$", call(load_config, {**OFFICIAL, "n_expert_group": 8}, strict=True))
scenario("preset-file-unknown-top-key", ConfigError, r"^sourse$",
         in_file("p.yaml", 'spec_version: "0.6.0"\nsourse: x\nconfig: {vocab_size: 10}\n', load_config))
scenario("huge-key-name-bounded", ConfigError, r"^k{50}", call(load_config, own(**{"k" * 1_000_000: 1})))

# ----------------------------------------------------------------------------- configs: rope forms
scenario("rope-scaling-string", ConfigError, r"^rope_scaling$", call(load_config, hf(rope_scaling="yarn")))
scenario("rope-scaling-list", ConfigError, r"^rope_scaling$", call(load_config, hf(rope_scaling=["yarn", 40])))
scenario("rope-scaling-no-type", ConfigError, r"^rope_scaling\.type$", call(load_config, hf(rope_scaling={"factor": 40, "original_max_position_embeddings": 4096})))
scenario("rope-scaling-factor-null", ConfigError, r"^rope_scaling\.factor$", call(load_config, hf(rope_scaling={**HF_V3["rope_scaling"], "factor": None})))
scenario("rope-scaling-factor-missing", ConfigError, r"^rope_scaling\.factor$",
         call(load_config, hf(rope_scaling={k: v for k, v in HF_V3["rope_scaling"].items() if k != "factor"})))
scenario("rope-scaling-factor-string", ConfigError, r"^rope_factor$", call(load_config, hf(rope_scaling={**HF_V3["rope_scaling"], "factor": "40"})))
scenario("rope-scaling-original-missing", ConfigError, r"^rope_scaling\.original_max_position_embeddings$",
         call(load_config, hf(rope_scaling={"type": "yarn", "factor": 40})))
scenario("rope-scaling-linear", ConfigError, r"^rope_scaling\.type$", call(load_config, hf(rope_scaling={"type": "linear", "factor": 4})))
scenario("rope-type-contradicts-type", ConfigError, r"^rope_scaling\.rope_type$",
         call(load_config, hf(rope_scaling={**HF_V3["rope_scaling"], "rope_type": "default"})))
scenario("rope-default-with-yarn-key", ConfigError, r"^rope_parameters\.factor$",
         call(load_config, {**HF_V3_T5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000, "factor": 40}}))
scenario("rope-parameters-contradict-rope-scaling", ConfigError, r"^rope_parameters\.factor$",
         call(load_config, hf(rope_parameters={**HF_V3["rope_scaling"], "factor": 32})))
scenario("rope-theta-contradicts-rope-parameters", ConfigError, r"^rope_parameters\.rope_theta$",
         call(load_config, {**HF_V3_T5, "rope_theta": 50000}))
scenario("rope-attention-factor", ConfigError, r"^rope_parameters\.attention_factor$",
         call(load_config, {**HF_V3_T5, "rope_parameters": {**HF_V3_T5["rope_parameters"], "attention_factor": 1.3}}))
scenario("rope-parameters-per-layer-type", ConfigError, r"^rope_parameters\.full_attention$",
         call(load_config, {**HF_V3_T5, "rope_parameters": {"full_attention": HF_V3_T5["rope_parameters"]}}, strict=True))

# ----------------------------------------------------------------------------- configs: types, enums, contradictions
scenario("rope-interleave-string", ConfigError, r"^rope_interleave$", call(load_config, hf(rope_interleave="false")))
scenario("rope-interleave-int", ConfigError, r"^rope_interleave$", call(load_config, hf(rope_interleave=0)))
scenario("norm-topk-prob-string", ConfigError, r"^norm_topk_prob$", call(load_config, hf(norm_topk_prob="true")))
scenario("yarn-truncate-string", ConfigError, r"^yarn_truncate$", call(load_config, hf(rope_scaling={**HF_V3["rope_scaling"], "truncate": "no"})))
scenario("topk-method-misspelled-value", ConfigError, r"^topk_method$", call(load_config, hf(topk_method="noaux-tc")))
scenario("scoring-func-capitalised", ConfigError, r"^scoring_func$", call(load_config, hf(scoring_func="Sigmoid")))
scenario("q-lora-rank-string", ConfigError, r"^q_lora_rank$", call(load_config, hf(q_lora_rank="1536")))
scenario("head-dim-contradiction", ConfigError, r"^head_dim$", call(load_config, {**HF_V3_T5, "head_dim": 128}))
scenario("qk-head-dim-contradiction", ConfigError, r"^qk_head_dim$", call(load_config, {**HF_V3_T5, "qk_head_dim": 256}))
scenario("kv-heads-contradiction", ConfigError, r"^num_key_value_heads$", call(load_config, hf(num_key_value_heads=1)))
scenario("mlp-layer-types-contradiction", ConfigError, r"^mlp_layer_types$", call(load_config, {**HF_V3_T5, "mlp_layer_types": ["dense"] * 61}))
scenario("tied-embeddings", ConfigError, r"^tie_word_embeddings$", call(load_config, hf(tie_word_embeddings=True)))
scenario("attention-bias", ConfigError, r"^attention_bias$", call(load_config, hf(attention_bias=True)))
scenario("hidden-act", ConfigError, r"^hidden_act$", call(load_config, hf(hidden_act="gelu")))

# ----------------------------------------------------------------------------- configs: numeric validity
scenario("rope-theta-one", ConfigError, r"^rope_theta$", call(load_config, own(rope_theta=1.0)))
scenario("rope-theta-one-cli", SystemExit, r"^2$", lambda folder: _cli(folder, "theta.yaml", json.dumps(own(rope_theta=1.0))))
scenario("rope-theta-half", ConfigError, r"^rope_theta$", call(load_config, hf(rope_theta=0.5)))
scenario("mscale-all-dim-1e200", ConfigError, r"^mscale_all_dim$", call(load_config, own(mscale_all_dim=1e200)))
scenario("mscale-all-dim-fuzzed", ConfigError, r"^mscale_all_dim$", call(load_config, hf(rope_scaling={**HF_V3["rope_scaling"], "mscale_all_dim": 9.6e154})))
scenario("mscale-negative", ConfigError, r"^mscale$", call(load_config, own(mscale=-1.0)))
scenario("rope-factor-inf", ConfigError, r"^rope_factor$", call(load_config, own(rope_factor=float("inf"))))
scenario("rms-norm-eps-nan", ConfigError, r"^rms_norm_eps$", call(load_config, own(rms_norm_eps=float("nan"))))
scenario("rope-dim-10-20", ConfigError, r"^qk_rope_head_dim$", call(load_config, own(qk_rope_head_dim=10**20)))
scenario("hidden-2-40", ConfigError, r"^hidden_size$", call(load_config, hf(hidden_size=2**40)))
scenario("layers-million", ConfigError, r"^num_hidden_layers$", call(load_config, hf(num_hidden_layers=10**6)))
scenario("experts-not-divisible", ConfigError, r"^n_routed_experts$", call(load_config, hf(n_routed_experts=255)))

# ----------------------------------------------------------------------------- config files
scenario("json-not-utf8", ConfigError, r"config\.json$", in_file("config.json", b'{"vocab_size": "\xff"}', load_config))
scenario("yaml-not-utf8", ConfigError, r"c\.yaml$", in_file("c.yaml", b"vocab_size: \xfe\xff\n", load_config))
scenario("json-list", ConfigError, r"config\.json$", in_file("config.json", "[1, 2]", load_config))
scenario("json-deeply-nested", ConfigError, r"config\.json$", in_file("config.json", "[" * 200_000 + "]" * 200_000, load_config))
scenario("json-malformed", ConfigError, r"config\.json$", in_file("config.json", "{not json", load_config))
scenario("yaml-alias-bomb-config", ConfigError, r"bomb\.yaml$", in_file("bomb.yaml", YAML_BOMB, load_config))
scenario("yaml-alias-bomb-spec-reader", SpecError, r"bomb\.yaml$", in_file("bomb.yaml", YAML_BOMB, read_yaml))
scenario("yaml-tag-never-executed", ConfigError, r"evil\.yaml$", in_file("evil.yaml", "x: !!python/object/apply:os.system ['true']\n", load_config))
scenario("missing-file", ConfigError, r"^preset$", call(load_config, "/nonexistent/config.json"))

# ----------------------------------------------------------------------------- kernel arguments and numerics
CORE = (np.zeros((1, 1, 2, 8)), np.zeros((2, 4, 1, 8)), np.array([[0, 1]]), np.array([5]))
scenario("core-scale-inf", InputError, r"^softmax_scale$", call(latent_attention_core, *CORE, 6, float("inf")))
scenario("core-scale-nan", InputError, r"^softmax_scale$", call(latent_attention_core, *CORE, 6, float("nan")))
scenario("core-scale-negative", InputError, r"^softmax_scale$", call(latent_attention_core, *CORE, 6, -0.1))
scenario("core-scale-bool", InputError, r"^softmax_scale$", call(latent_attention_core, *CORE, 6, True))
scenario("core-head-dim-v-bool", InputError, r"^head_dim_v$", call(latent_attention_core, *CORE, True, 0.1))
scenario("core-head-dim-v-float", InputError, r"^head_dim_v$", call(latent_attention_core, *CORE, 6.0, 0.1))
scenario("core-causal-string", InputError, r"^causal$", call(latent_attention_core, *CORE, 6, 0.1, "no"))


def _gate(logit: float) -> tuple[dict, np.ndarray]:
    weights = {"mlp.gate.weight": np.zeros((TINY.n_routed_experts, TINY.hidden_size)), "mlp.gate.e_score_correction_bias": np.zeros(TINY.n_routed_experts)}
    weights["mlp.gate.weight"][:, 0] = 1.0
    hidden = np.zeros((1, TINY.hidden_size))
    hidden[0, 0] = logit
    return weights, hidden


scenario("sigmoid-routing-0-over-0", NumericError, r"^weights$", call(route, TINY, *_gate(-800.0)))
scenario("sigmoid-routing-0-over-0-float32", NumericError, r"^weights$", call(route, TINY, *_gate(-128.0), dtype=np.float32))
def _overflowing_mla(folder: Path):
    weights, hidden = generate_attention_weights(TINY), np.full((1, 2, TINY.hidden_size), 3e38, np.float32)

    def run():
        with np.errstate(over="ignore", invalid="ignore"):
            mla_forward(TINY, weights, hidden, dtype=np.float32)
    return run


scenario("mla-float32-overflow", NumericError, r"^MLA\.\d+ output$", _overflowing_mla)


def _model_weights(**bad: float) -> dict:
    weights = dict(generate_weights(TINY, 0))
    for name, value in bad.items():
        name = name.replace("__", ".")
        weights[name] = weights[name].copy()
        weights[name].flat[3] = value
    return weights


scenario("lm-head-nan", WeightError, r"^lm_head\.weight$", call(model_forward, TINY, _model_weights(lm_head__weight=np.nan), np.array([[1, 2]])))
scenario("final-norm-inf", WeightError, r"^model\.norm\.weight$", call(model_forward, TINY, _model_weights(model__norm__weight=np.inf), np.array([[1, 2]])))
scenario("embedding-nan", WeightError, r"^model\.embed_tokens\.weight$",
         call(model_forward, TINY, _model_weights(model__embed_tokens__weight=np.nan), np.array([[3, 2]])))


def _nan_written_in_place(folder: Path):
    weights = {name: value.copy() for name, value in generate_attention_weights(TINY).items()}
    hidden = np.ones((1, 2, TINY.hidden_size))
    mla_forward(TINY, weights, hidden)  # checked once ...
    weights["kv_b_proj.weight"][0, 0] = np.nan  # ... then changed in place
    return lambda: mla_forward(TINY, weights, hidden)


scenario("weight-nan-written-in-place", WeightError, r"^kv_b_proj\.weight$", _nan_written_in_place)

# ----------------------------------------------------------------------------- caches and memory
WIDTH = TINY.latent_cache_width
scenario("cache-lengths-past-rows", CacheError, r"^lengths$", call(LatentCache, np.zeros((2, 4, WIDTH)), np.array([10, 2])))
scenario("cache-rows-2d", CacheError, r"^rows$", call(LatentCache, np.zeros((4, WIDTH)), np.array([1])))
scenario("cache-rows-int", CacheError, r"^rows$", call(LatentCache, np.zeros((1, 4, WIDTH), np.int64), np.array([1])))
scenario("naive-cache-lengths-past-rows", CacheError, r"^lengths$",
         call(NaiveCache, np.zeros((1, 2, 4, TINY.qk_head_dim)), np.zeros((1, 2, 4, TINY.v_head_dim)), np.array([3])))
scenario("naive-cache-keys-values-disagree", CacheError, r"^values$",
         call(NaiveCache, np.zeros((1, 2, 4, TINY.qk_head_dim)), np.zeros((1, 3, 4, TINY.v_head_dim)), np.array([1])))
scenario("cache-of-another-config", CacheError, r"^cache$",
         call(mla_forward, load_preset("tiny-yarn"), generate_attention_weights(load_preset("tiny-yarn")),
              np.ones((1, 1, load_preset("tiny-yarn").hidden_size)), cache=LatentCache.empty(TINY, 1)))
def _cache_from_arrays_reused(folder: Path):
    weights, hidden = generate_attention_weights(TINY), np.ones((1, 1, TINY.hidden_size))
    cache = LatentCache(np.zeros((1, 4, WIDTH)), np.array([0]))  # no fingerprint: bound by its first use
    mla_forward(TINY, weights, hidden, cache=cache)
    return lambda: mla_forward(TINY.replace(rope_theta=20000.0), weights, hidden, cache=cache)


scenario("cache-from-arrays-then-another-config", CacheError, r"^cache$", _cache_from_arrays_reused)
scenario("cache-empty-7-pib", ResourceError, r"^LatentCache$", call(LatentCache.empty, TINY, 10**5, capacity=10**6))
scenario("cache-empty-negative-capacity", CacheError, r"^capacity$", call(LatentCache.empty, TINY, 1, capacity=-1))
scenario("naive-cache-empty-huge", ResourceError, r"^NaiveCache$", call(NaiveCache.empty, TINY, 10**4, capacity=10**7))
scenario("paged-cache-empty-huge", ResourceError, r"^PagedLatentCache$", call(PagedLatentCache.empty, TINY, 10**4, max_tokens=10**7))
scenario("paged-cache-block-size-0", CacheError, r"^block_size$", call(PagedLatentCache.empty, TINY, 1, max_tokens=8, block_size=0))
scenario("weights-of-hidden-1e9", ResourceError, r"^model\.embed_tokens\.weight$",
         call(generate_weights, TINY.replace(hidden_size=10**9), names=["model.embed_tokens.weight"]))
scenario("weight-table-1e8-experts", ResourceError, r"^weight_shapes$",
         call(weight_shapes, TINY.replace(n_routed_experts=10**8, n_group=1, topk_group=1, num_hidden_layers=1000)))

# ----------------------------------------------------------------------------- golden files


def _npz_bomb(folder: Path):
    path = folder / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": (2**24,)})
            block = bytes(2**20)
            for _ in range(2**7):  # 128 MiB of zeros in ~130 kB
                handle.write(block)
    return lambda: read_npz(path)


def _npz_header_lies(folder: Path):
    path = folder / "lies.npz"
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x.npy", "w") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": (10**10,)})
            handle.write(bytes(64))
    return lambda: read_npz(path)


def _npz_link(folder: Path):
    outside = folder / "outside"
    outside.mkdir()
    write_npz(outside / "real.npz", {"x": np.ones(2)})
    (folder / "golden").mkdir()
    (folder / "golden" / "case.npz").symlink_to(outside / "real.npz")
    return lambda: read_npz(folder / "golden" / "case.npz")


def _npz_member(folder: Path):
    path = folder / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.txt", "hello")
    return lambda: read_npz(path)


def _npz_declared(folder: Path):
    write_npz(folder / "case.npz", {"x": np.ones(3)})
    return lambda: read_npz(folder / "case.npz", declared={"x": {"dtype": "<f4", "shape": [3]}})


def _npz_pickle(folder: Path):
    np.savez(folder / "evil.npz", payload=np.array([{"a": 1}], dtype=object))
    return lambda: read_npz(folder / "evil.npz")


scenario("npz-zip-bomb", GoldenError, r"bomb\.npz$", _npz_bomb)
scenario("npz-header-1e10-elements", GoldenError, r"lies\.npz$", _npz_header_lies)
scenario("npz-symlink-outside", GoldenError, r"case\.npz$", _npz_link)
scenario("npz-foreign-member", GoldenError, r"odd\.npz$", _npz_member)
scenario("npz-disagrees-with-manifest", GoldenError, r"case\.npz$", _npz_declared)
scenario("npz-pickle", GoldenError, r"evil\.npz$", _npz_pickle)


def safetensors(header, body: bytes = b"", length: int | None = None):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return in_file("t.safetensors", struct.pack("<Q", len(encoded) if length is None else length) + encoded + body, read_safetensors)


GOOD_ENTRY = {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}
scenario("safetensors-header-2-62", GoldenError, r"t\.safetensors$", safetensors({}, length=2**62))
scenario("safetensors-short", GoldenError, r"t\.safetensors$", in_file("t.safetensors", b"\x01\x02", read_safetensors))
scenario("safetensors-header-not-json", GoldenError, r"t\.safetensors$", safetensors(b"{nope"))
scenario("safetensors-header-list", GoldenError, r"t\.safetensors$", safetensors([1, 2]))
scenario("safetensors-no-offsets", GoldenError, r"x'?\.data_offsets$", safetensors({"x": {"dtype": "F64", "shape": [2]}}, bytes(16)))
scenario("safetensors-unknown-dtype", GoldenError, r"x'?\.dtype$", safetensors({"x": {**GOOD_ENTRY, "dtype": "F8_E4M3"}}, bytes(16)))
scenario("safetensors-offsets-past-body", GoldenError, r"x'?\.data_offsets$", safetensors({"x": {**GOOD_ENTRY, "data_offsets": [0, 64]}}, bytes(16)))
scenario("safetensors-span-mismatch", GoldenError, r"x'?\.data_offsets$", safetensors({"x": {**GOOD_ENTRY, "shape": [3]}}, bytes(16)))
scenario("safetensors-bad-shape", GoldenError, r"x'?\.shape$", safetensors({"x": {**GOOD_ENTRY, "shape": [-2]}}, bytes(16)))
scenario("safetensors-metadata-not-strings", GoldenError, r"__metadata__$", safetensors({"__metadata__": {"a": 1}}))


def _manifest(folder: Path, text: str) -> Path:
    (folder / "golden").mkdir(exist_ok=True)
    (folder / "golden" / "manifest.yaml").write_text(text)
    return folder / "golden"


@functools.lru_cache(maxsize=1)
def _committed_entry() -> tuple[dict, dict]:
    from mla_ref.golden.generate import default_golden_dir
    document = read_manifest(default_golden_dir() / "manifest.yaml")
    return {key: value for key, value in document.items() if key != "cases"}, document["cases"]["mla.prefill/tiny/seed0"]


def _real_manifest(folder: Path, **changes) -> Path:
    """A valid mla-ref manifest listing one committed case, with ``changes``."""
    import yaml
    header, entry = _committed_entry()
    return _manifest(folder, yaml.safe_dump({**header, "cases": {"mla.prefill/tiny/seed0": entry}, **changes}, sort_keys=False))


scenario("manifest-alias-bomb", GoldenError, r"manifest\.yaml$", lambda folder: (lambda d: lambda: read_manifest(d / "manifest.yaml"))(_manifest(folder, YAML_BOMB)))
scenario("export-manifest-alias-bomb", GoldenError, r"manifest\.yaml$",
         lambda folder: (lambda d: lambda: export(d, folder / "out"))(_manifest(folder, YAML_BOMB)))
scenario("generate-select-nothing", InputError, r"^select$", lambda folder: lambda: generate(folder / "g", "no-case-has-this-name"))
scenario("generate-foreign-manifest", GoldenError, r"manifest\.yaml$",
         lambda folder: (lambda d: lambda: generate(d, "mla.prefill/tiny/seed0"))(_manifest(folder, "title: my notes\n")))
scenario("generate-foreign-manifest-all-cases", GoldenError, r"manifest\.yaml$",
         lambda folder: (lambda d: lambda: generate(d))(_manifest(folder, "title: my notes\n")))
scenario("generate-over-on-demand-manifest", GoldenError, r"manifest\.yaml$",
         lambda folder: (lambda d: lambda: generate(d, "mla.prefill/tiny/seed0"))(_real_manifest(folder, on_demand=True)))
def _other_cases(folder: Path):
    entry = _committed_entry()[1]
    directory = _real_manifest(folder, cases={"someone.elses/case": dict(entry, file="someone.elses__case.npz")})
    return lambda: generate(directory, "mla.prefill/tiny/seed0")


scenario("generate-over-other-cases", GoldenError, r"manifest\.yaml$", _other_cases)
scenario("generate-dir-is-a-file", GoldenError, r"golden$", in_file("golden", "x", lambda path: generate(path, "mla.prefill/tiny/seed0")))
scenario("generate-dir-unwritable", GoldenError, r"^/proc/", call(generate, Path("/proc/mla-ref-test/golden"), "mla.prefill/tiny/seed0"))
scenario("export-out-is-a-file", GoldenError, r"out$", in_file("out", "x", lambda path: export(None, path, "mla.prefill/tiny/seed0")))
scenario("export-out-unwritable", GoldenError, r"^/proc/", call(export, None, Path("/proc/mla-ref-test/out"), "mla.prefill/tiny/seed0"))
scenario("export-select-nothing", InputError, r"^select$", lambda folder: lambda: export(None, folder / "out", "no-case-has-this-name"))
scenario("write-safetensors-unwritable", GoldenError, r"^/proc/", call(write_safetensors, Path("/proc/mla-ref-test/x.safetensors"), {"x": np.ones(2)}))


def _cli(folder: Path, name: str, text: str):
    path = folder / name
    path.write_text(text)

    def run():
        raise SystemExit(main(["info", str(path)]))
    return run


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(path.relative_to(folder)): (path.is_symlink(), path.lstat().st_size, path.lstat().st_mtime_ns) for path in folder.rglob("*")}


def test_the_catalogue_holds_at_least_80_scenarios():
    assert len(SCENARIOS) >= 80


@pytest.mark.parametrize("error, field, setup", SCENARIOS)
def test_bad_input(tmp_path, error, field, setup, capsys):
    action = setup(tmp_path)
    before = _snapshot(tmp_path)
    set_memory_limit(2 * 2**30)  # the memory scenarios must not depend on this machine's free memory
    try:
        with pytest.raises(error) as caught:
            action()
    finally:
        set_memory_limit(None)
    named = str(caught.value.code) if error is SystemExit else caught.value.what
    assert re.search(field, named), f"{named!r} does not name {field!r}: {caught.value}"
    if error is SystemExit:
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mla-ref: error: "), lines
    else:
        assert len(str(caught.value)) < 2500 and str(caught.value).endswith(")")  # bounded, with its spec id
    assert _snapshot(tmp_path) == before, "the failed call wrote, changed or removed a file"


# ----------------------------------------------------------------------------- documented correct results of measured scenarios

def test_a_weight_scaled_in_place_is_used_scaled_in_float32():
    """Issue 14: a float32 run kept the stale cast of a weight changed in place (ratio 1.0 where 2.0 is right)."""
    weights = {name: value.copy() for name, value in generate_attention_weights(TINY).items()}
    hidden = np.random.default_rng(0).standard_normal((1, 3, TINY.hidden_size))
    before = mla_forward(TINY, weights, hidden, dtype=np.float32).output
    weights["o_proj.weight"] *= 2.0
    after = mla_forward(TINY, weights, hidden, dtype=np.float32).output
    assert np.array_equal(after, 2.0 * before)  # o_proj is the last, linear step: exactly twice, power-of-two scaling


def test_generated_weights_refuse_in_place_changes():
    weight = generate_attention_weights(TINY)["o_proj.weight"]
    with pytest.raises(ValueError, match="read-only"):
        weight *= 2.0


def test_info_of_a_huge_valid_config_counts_without_listing_tensors():
    """Issue 14: mla-ref info on 10^8 experts x 1000 layers asked for memory; the count is per layer, analytic."""
    from mla_ref.info import parameter_counts
    config = TINY.replace(n_routed_experts=10**8, n_group=1, topk_group=1, num_hidden_layers=1000)
    small = TINY.replace(n_routed_experts=16, n_group=1, topk_group=1, num_hidden_layers=1000)
    per_expert = 3 * config.moe_intermediate_size * config.hidden_size + config.hidden_size + 1  # w1, w2, w3, gate row, bias
    extra = (10**8 - 16) * per_expert * (len(config.moe_layers) + config.num_nextn_predict_layers)
    listed = sum(int(np.prod(shape)) for shape in weight_shapes(small).values())  # the small config's tensors, listed one by one
    counted = parameter_counts(config)
    assert counted["main"] + counted["mtp"] == listed + extra
    assert parameter_counts(small)["main"] + parameter_counts(small)["mtp"] == listed
