"""What the golden code refuses, and that each refusal is a GoldenError naming the file or field, the problem and the spec id.

Writes that cannot complete leave nothing half-written; files that are not what they claim
(an npy version numpy never wrote, a safetensors header entry that is no object, a file over the
memory limit) are refused before any tensor is read; a case definition, weights recipe or
profile the generator does not know is refused, not guessed.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from mla_ref.checks import set_memory_limit
from mla_ref.config import load_preset
from mla_ref.errors import GoldenError
from mla_ref.golden.cases import (apply_noise_from, build_fp8_cache_write, build_moe_route, case_config, case_definitions,
                                  own_config_definitions, rebuild_weights, weights_recipe)
from mla_ref.golden.generate import default_golden_dir, default_on_demand_dir
from mla_ref.golden.integrity import field_differences, verify_case_tensors
from mla_ref.golden.manifest import SCHEMA, read_manifest
from mla_ref.golden.storage import atomic_file, read_npz, read_safetensors, temporary_path, write_npz
from mla_ref.weights import generate_attention_weights

REPOSITORY = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- writes that cannot complete

def test_a_write_that_cannot_be_renamed_into_place_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "case.npz"
    target.mkdir()  # a folder in the way: the rename fails
    (target / "keep").write_text("")
    with pytest.raises(GoldenError, match=r"case\.npz: cannot be written: .* \(GOLDEN.storage\)$"):
        write_npz(target, {"x": np.zeros(2)})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["case.npz"] and target.is_dir()


def test_a_failing_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "manifest.yaml"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(GoldenError, match=r"manifest\.yaml: cannot be written: disk full \(GOLDEN.storage\)$"):
        with atomic_file(target) as temporary:
            temporary.write_text("half", encoding="utf-8")
            raise OSError("disk full")
    assert target.read_text(encoding="utf-8") == "old" and not temporary.exists()


def test_an_unwritable_temporary_file_is_a_golden_error(tmp_path):
    target = tmp_path / "case.npz"
    temporary_path(target).mkdir()  # where the unrenamed write goes is taken
    with pytest.raises(GoldenError, match=r"cannot be written: Is a directory \(GOLDEN.storage\)$"):
        write_npz(target, {"x": np.zeros(2)}, atomic=False)


# ---------------------------------------------------------------- files that are not what they claim

def _npz_with_member(path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)


def test_an_npy_member_of_an_unknown_format_version_is_refused(tmp_path):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(3), version=(1, 0))
    payload = bytearray(buffer.getvalue())
    payload[6:8] = bytes([3, 0])  # magic \x93NUMPY, then major 3 minor 0 (numpy writes 1.0, 2.0 and 3.0 only for utf-8 names)
    _npz_with_member(tmp_path / "v3.npz", "x.npy", bytes(payload))
    with pytest.raises(GoldenError, match=r"v3\.npz: member 'x\.npy': unsupported npy version \(3, 0\) \(GOLDEN.storage\)$"):
        read_npz(tmp_path / "v3.npz")


def test_npz_members_that_disagree_with_the_declared_tensors_are_refused(tmp_path):
    write_npz(tmp_path / "case.npz", {"a": np.zeros(2), "b": np.ones(2)})
    with pytest.raises(GoldenError, match=r"members \['a\.npy', 'b\.npy'\] disagree with the declared tensors \['a', 'c'\]"):
        read_npz(tmp_path / "case.npz", {"a": {"dtype": "<f8", "shape": [2]}, "c": {"dtype": "<f8", "shape": [2]}})


def _safetensors(header: dict, body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def test_a_safetensors_header_entry_that_is_no_object_is_refused(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(_safetensors({"q_proj.weight": [0, 8]}, bytes(8)))
    with pytest.raises(GoldenError, match=r"w\.safetensors: 'q_proj\.weight': header entry is not an object \(GOLDEN.storage\)$"):
        read_safetensors(tmp_path / "w.safetensors")


def test_a_safetensors_file_over_the_memory_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors({"x": {"dtype": "F64", "shape": [16], "data_offsets": [0, 128]}}, bytes(128)))
    size = path.stat().st_size
    set_memory_limit(size - 1)
    try:
        with pytest.raises(GoldenError, match=rf"w\.safetensors: {size} bytes, over the memory limit of {size - 1} \(GOLDEN.storage\)$"):
            read_safetensors(path)
    finally:
        set_memory_limit(None)
    assert read_safetensors(path)[0]["x"].shape == (16,)


def test_a_manifest_with_a_malformed_own_config_is_refused(tmp_path):
    document = {"schema": SCHEMA, "spec_version": "0", "generator_version": "0", "numpy_version": np.__version__,
                "own_config": {"name": "mine", "config": "tiny"}, "cases": {}}  # config must be the config's mapping, not a name
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    with pytest.raises(GoldenError, match=r"^manifest\.yaml: own_config: expected a mapping with name \(str\) and config "
                                          r"\(mapping\) \(GOLDEN.manifest\)$"):
        read_manifest(tmp_path / "manifest.yaml")


def test_a_case_file_with_a_tensor_more_or_less_than_its_manifest_entry_is_tampered():
    recorded = {"dtype": "<f8", "shape": [1], "sha256": "0" * 64}
    entry = {"file": "mla.core__x.npz", "tensors": {"input:q": recorded, "output:out": recorded}, "profiles": {}}
    with pytest.raises(GoldenError, match=r"^mla\.core__x\.npz: tampered golden: tensors not in the manifest \['input:smuggled'\], "
                                          r"in the manifest but not in the file \['output:out'\] \(GOLDEN.storage\)$"):
        verify_case_tensors(entry, {"input:q": np.zeros(1), "input:smuggled": np.zeros(1)})


# ---------------------------------------------------------------- definitions the generator does not know

def test_an_unknown_weights_design_is_refused_not_guessed():
    with pytest.raises(GoldenError, match=r"^weights\.design: expected none, echo, logit_gain, final_norm_spread or mtp_norm_spread, got 'lora' "
                                          r"\(GOLDEN.storage\)$"):
        rebuild_weights(load_preset("tiny"), {"design": "lora", "seed": 0})


def test_an_own_config_name_is_one_id_segment():
    with pytest.raises(GoldenError, match=r"^config name: expected one id segment, got 'team/model' \(GOLDEN.own_config\)$"):
        own_config_definitions("team/model", load_preset("tiny").to_dict())


def test_noise_from_a_profile_the_case_does_not_emulate_is_refused():
    """fp64's noise comes from fp32's scaled by u_fp64 / u_fp32 (TOLERANCE.2): without an fp32 emulation it cannot be derived."""
    noise, noise_max = {"fp64": {"output:out": 0.0}}, {"fp64": {"output:out": 0.0}}
    with pytest.raises(GoldenError, match=r"^case/x: profile fp64: noise_from .* needs scale unit_roundoff_ratio and a profile the "
                                          r"case emulates \(\['fp64'\]\) \(TOLERANCE.2\)$"):
        apply_noise_from("case/x", "fp64", noise, noise_max)


def test_on_demand_cases_are_built_beside_golden_and_never_committed():
    assert default_on_demand_dir() == default_golden_dir().parent / "golden-on-demand"
    assert "golden-on-demand/" in (REPOSITORY / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_a_manifest_is_parsed_again_when_its_bytes_change_and_each_reader_gets_its_own_copy(tmp_path):
    """read_manifest keeps parsed manifests by the sha256 of their bytes: an edit is seen at once, a change by one caller is not."""
    path = tmp_path / "manifest.yaml"
    document = {"schema": SCHEMA, "spec_version": "0", "generator_version": 1, "numpy_version": np.__version__, "cases": {}}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    first = read_manifest(path)
    first["cases"]["mla.prefill/tiny/seed0"] = {}
    first.pop("spec_version")
    assert read_manifest(path) == document
    path.write_text(yaml.safe_dump(dict(document, spec_version="1"), sort_keys=False), encoding="utf-8")  # same size, new bytes
    assert read_manifest(path)["spec_version"] == "1"


def test_a_manifest_over_the_yaml_size_limit_is_refused_unread(tmp_path, monkeypatch):
    from mla_ref import spec
    from mla_ref.golden import manifest
    path = tmp_path / "manifest.yaml"
    path.write_text(f"schema: {SCHEMA}\n", encoding="utf-8")
    limit = path.stat().st_size - 1
    monkeypatch.setattr(spec, "MAX_YAML_BYTES", limit)
    monkeypatch.setattr(manifest, "MAX_YAML_BYTES", limit)
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(GoldenError, match=rf"manifest\.yaml: {limit + 1} bytes; a YAML file here is at most {limit} \(GOLDEN.manifest\)$"):
        read_manifest(path)


def test_an_unreadable_manifest_is_refused_naming_the_file_and_why(tmp_path, monkeypatch):
    """The tests run as root, where a chmod leaves the file readable: the read itself is made to fail."""
    path = tmp_path / "manifest.yaml"
    path.write_text(f"schema: {SCHEMA}\n", encoding="utf-8")

    def unreadable(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(type(path), "read_bytes", unreadable)
    with pytest.raises(GoldenError, match=r"manifest\.yaml: cannot be read: Permission denied \(GOLDEN.manifest\)$"):
        read_manifest(path)


def test_a_number_written_as_int_or_float_is_one_value_but_a_bool_is_not_a_number():
    """YAML may write 1 for the spec's 1.0 (the same value); True for 1 is another value (field_differences)."""
    assert field_differences("config.rope_factor", 1, 1.0) == []
    assert field_differences("config.rope_factor", 40.0, 40) == []
    assert field_differences("config.x", True, 1) == ["config.x: manifest True, spec 1"]
    assert field_differences("config.x", 0, False) == ["config.x: manifest 0, spec False"]
    assert field_differences("config.x", 2, 1.0) == ["config.x: manifest 2, spec 1.0"]


# ---------------------------------------------------------------- case designs the generator cannot meet

def _definition(case_id: str, **layout) -> dict:
    definition = next(definition for definition in case_definitions() if definition["id"] == case_id)
    return {**definition, "layout": {**definition["layout"], **layout}}


@pytest.mark.parametrize("layout, message", [
    ({"require": ["bias_ignored"]}, r"^layout\.require: unknown requirement 'bias_ignored' \(GOLDEN.cases\)$"),
    ({"require": ["group_rule_matters"], "per_requirement": 10 ** 6},
     r"^moe\.route\.v3/tiny/seed0: too few tokens where group_rule_matters \(found \d+\) \(GOLDEN.cases\)$"),
    ({"require": [], "near_ties": 3, "max_near_margin": 0.0}, r"^moe\.route\.v3/tiny/seed0: too few near-tie tokens \(found 0\) \(GOLDEN.cases\)$"),
    ({"require": [], "min_margin": 10.0}, r"^moe\.route\.v3/tiny/seed0: could not find 24 tokens with routing margins > 10.0 \(GOLDEN.cases\)$"),
], ids=["unknown-requirement", "too-few-per-requirement", "too-few-near-ties", "margin-out-of-reach"])
def test_a_routing_design_that_cannot_be_met_is_refused(layout, message):
    definition = _definition("moe.route.v3/tiny/seed0", **layout)
    with pytest.raises(GoldenError, match=message):
        build_moe_route(definition, case_config(definition))


def test_an_fp8_cache_write_case_needs_a_token_per_special_tile():
    definition = _definition("fp8.cache.write/tiny-r512/seed0", tokens=3)
    with pytest.raises(GoldenError, match=r"^layout\.tokens: expected at least 4 \(one per special tile\), got 3 \(GOLDEN.cases\)$"):
        build_fp8_cache_write(definition, case_config(definition))


def test_an_on_demand_layer_stores_the_recipe_of_its_weights_and_the_recipe_rebuilds_them():
    """On-demand MLA / DSA layers store how their weights are made (seed, logit gain, FP8 checkpoint): the gain scales the
    query and key-value up-projections of the generated weights and nothing else; an FP8 checkpoint takes no gain."""
    on_demand = {d["id"]: weights_recipe(d) for d in case_definitions(on_demand=True) if d.get("on_demand") and d["level"] == "layer"}
    assert on_demand["mla.prefill.fp8/deepseek-v3/seed0"]["fp8"] is True
    assert "fp8" not in on_demand["mla.prefill.yarn/deepseek-v3/seed0"]
    config = load_preset("tiny")
    generated = generate_attention_weights(config, seed=3)
    rebuilt = rebuild_weights(config, {"generator": "mla_ref.weights.generate_attention_weights", "seed": 3, "design": "logit_gain",
                                       "logit_gain": 2.0})
    assert set(rebuilt) == set(generated)
    for name, value in generated.items():
        assert np.array_equal(rebuilt[name], value * (2.0 if name in ("q_b_proj.weight", "kv_b_proj.weight") else 1.0)), name
    fp8_config = load_preset("tiny-fp8")
    recipe = {"generator": "mla_ref.weights.generate_attention_weights", "seed": 3, "design": "logit_gain", "logit_gain": 1.0, "fp8": True}
    checkpoint = rebuild_weights(fp8_config, recipe)
    assert {name: value.tobytes() for name, value in checkpoint.items()} == \
        {name: value.tobytes() for name, value in generate_attention_weights(fp8_config, seed=3, fp8=True).items()}
    with pytest.raises(GoldenError, match=r"^layout\.logit_gain: expected 1\.0 with fp8 weights \(FP8 codes take no gain\), got 2\.0 "
                                          r"\(GOLDEN.cases\)$"):
        rebuild_weights(fp8_config, {**recipe, "logit_gain": 2.0})
