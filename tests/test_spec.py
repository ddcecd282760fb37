"""The spec files load, are well formed, every step names a function that cites its id (MOE, MODEL and MTP steps also
their paper, on the docstring's first line), and every entry point exists."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from mla_ref import spec as spec_module
from mla_ref.config import ModelConfig, field_specs
from mla_ref.errors import SpecError
from mla_ref.spec import evaluate_dim, evaluate_shape, load_spec_file, load_steps, read_yaml, resolve_function, spec_version

SECTION_FILES = sorted(path.name for path in spec_module.spec_dir().glob("*.yaml") if "steps" in (read_yaml(path) or {}))


def test_the_index_lists_every_spec_file():
    listed = set(load_spec_file("spec.yaml")["files"])
    present = {path.name for path in spec_module.spec_dir().glob("*.yaml")} - {"spec.yaml"}
    assert present <= listed, f"spec/spec.yaml files: does not list {sorted(present - listed)}"
    assert len(SECTION_FILES) >= 4



def test_every_file_has_the_index_version():
    version = spec_version()
    for path in sorted(spec_module.spec_dir().rglob("*.yaml")):
        name = str(path.relative_to(spec_module.spec_dir()))
        assert load_spec_file(name)["spec_version"] == version, name


@pytest.mark.parametrize("file", SECTION_FILES)
def test_steps_are_ordered_and_complete(file):
    steps = load_steps(file)
    section = load_spec_file(file)["section"]
    assert section == file.removesuffix(".yaml").upper(), f"{file}: section {section}"
    ids = [step["id"] for step in steps]
    numbers = [int(step_id.removeprefix(f"{section}.")) for step_id in ids]
    # SECTION.1, SECTION.2, ... in order; a gap only while two branches add steps to one section (FP8.20 beside FP8.9+)
    assert ids == [f"{section}.{n}" for n in numbers] and numbers[0] == 1 and numbers == sorted(set(numbers)), \
        "ids must be SECTION.1, SECTION.2, ... in order"
    for step in steps:
        assert step["pitfalls"] is not None and step["equation"].strip()


@pytest.mark.parametrize("file", SECTION_FILES)
def test_step_functions_exist_and_cite_their_id(file):
    for step in load_steps(file):
        function = resolve_function(step["function"])
        assert callable(function), step["id"]
        doc = function.__doc__ or ""
        first_line = doc.strip().splitlines()[0] if doc.strip() else ""
        assert step["id"] in first_line, f"{step['function']} docstring must cite {step['id']} on its first line"


PAPERS = {"moe.yaml": ("V2R", "V3R"), "model.yaml": ("V3R",), "mtp.yaml": ("V3R",)}  # what each section's docstrings cite
CITING = [(file, step) for file in PAPERS for step in load_steps(file)]


@pytest.mark.parametrize("file, step", CITING, ids=[step["id"] for _, step in CITING])
def test_every_step_names_a_function_citing_its_id_and_the_paper(file, step):
    assert step["paper"] and step["equation"] and step["pitfalls"], step["id"]
    first_line = resolve_function(step["function"]).__doc__.strip().splitlines()[0]
    assert first_line.startswith(f"{step['id']} — "), first_line
    assert any(paper in first_line for paper in PAPERS[file]), first_line


@pytest.mark.parametrize("file", [file for file in SECTION_FILES if "entry_points" in load_spec_file(file)])
def test_entry_points_exist(file):
    for entry in load_spec_file(file)["entry_points"].values():
        assert callable(resolve_function(entry["function"])), entry["function"]


def test_config_fields_match_the_dataclass():
    assert [f.name for f in dataclasses.fields(ModelConfig)] == list(field_specs())


def test_derived_quantities_name_existing_code():
    for name, derived in load_spec_file("config.yaml")["derived"].items():
        assert resolve_function(derived["function"]) is not None, name


def test_every_field_documents_its_external_names():
    for name, spec in field_specs().items():
        assert "hf" in spec and "official" in spec and spec.get("meaning"), name


def test_weight_table_shapes_evaluate_for_every_preset():
    from mla_ref.config import load_preset, preset_names
    from mla_ref.weights import weight_shapes
    for name in preset_names():
        shapes = weight_shapes(load_preset(name))
        assert all(all(dim > 0 for dim in shape) for shape in shapes.values()), name


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - id: MLA.1\n    name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml.*line"):
        read_yaml(bad)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("x: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(SpecError, match="evil.yaml"):
        read_yaml(evil)


def test_missing_step_key_names_file_and_key(tmp_path, monkeypatch):
    (tmp_path / "spec.yaml").write_text(f'spec_version: "{spec_version()}"\n')
    (tmp_path / "mla.yaml").write_text(textwrap.dedent(f"""\
        spec_version: "{spec_version()}"
        steps:
          - id: MLA.1
            name: query_latent
    """))
    monkeypatch.setattr(spec_module, "spec_dir", lambda: tmp_path)
    load_spec_file.cache_clear()
    try:
        with pytest.raises(SpecError, match=r"mla\.yaml\.steps\[0\]\.inputs: required key is missing"):
            load_steps("mla.yaml")
    finally:
        load_spec_file.cache_clear()


def test_version_mismatch_is_reported(tmp_path, monkeypatch):
    (tmp_path / "spec.yaml").write_text('spec_version: "9.9.9"\n')
    (tmp_path / "rope.yaml").write_text('spec_version: "0.0.1"\nsteps: []\n')
    monkeypatch.setattr(spec_module, "spec_dir", lambda: tmp_path)
    load_spec_file.cache_clear()
    try:
        with pytest.raises(SpecError, match=r"rope\.yaml\.spec_version"):
            load_spec_file("rope.yaml")
    finally:
        load_spec_file.cache_clear()


def test_shape_expressions():
    symbols = {"heads": 4, "qk_head_dim": 24, "q_lora_rank": 8}
    assert evaluate_shape("[heads * qk_head_dim, q_lora_rank]", symbols) == (96, 8)
    assert evaluate_dim("2 * (heads + 1) // 3", symbols) == 3
    assert evaluate_shape("[]", symbols) == ()
    with pytest.raises(SpecError, match="unknown or unset symbol 'nope'"):
        evaluate_dim("nope + 1", symbols)
    with pytest.raises(SpecError, match="unsupported syntax"):
        evaluate_dim("__import__('os')", symbols)
