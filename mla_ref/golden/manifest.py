"""golden/manifest.yaml: what each committed case holds, with hashes, and its schema check."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import GoldenError, SpecError, shown
from ..spec import MAX_YAML_BYTES, read_yaml
from .cases import Case, case_args, case_config, file_name
from .storage import atomic_file, tensor_digest

SCHEMA = "mla-ref-golden-manifest/1"
GENERATOR_VERSION = 1
CASE_KEYS = {"file": str, "entry_point": str, "level": str, "preset": str, "seed": int, "steps": list, "args": dict,
             "config": dict, "profiles": dict, "tensors": dict, "purpose": str}
TENSOR_KEYS = {"dtype": str, "shape": list, "sha256": str}
RECIPE_KEYS = {"generator": str, "seed": int, "design": str, "digest": str}
PARSED_KEPT = 4  # manifests kept parsed, by the sha256 of their bytes (the committed one and a few edited copies)
_parsed: dict[bytes, Any] = {}


def definition_fields(definition: dict) -> dict:
    """The fields of a manifest entry that follow from the case's definition alone (what check and verify compare)."""
    config = case_config(definition)
    return {
        "file": file_name(definition["id"]),
        "entry_point": definition["entry_point"],
        "level": definition["level"],
        "preset": definition["preset"],
        "overrides": dict(definition.get("overrides", {})),
        "seed": int(definition.get("seed", 0)),
        "steps": list(definition["steps"]),
        "args": {name: (value.item() if isinstance(value, np.generic) else value) for name, value in case_args(definition, config).items()},
        "config": config.to_dict(),
        "purpose": str(definition.get("purpose", "")),
        "pitfalls": [str(p) for p in definition.get("pitfalls", [])],
        **({"extension": str(definition["extension"])} if definition.get("extension") else {}),
    }


def case_entry(case: Case) -> dict:
    """The manifest entry of one case: its definition's fields, then what building it recorded."""
    defined = definition_fields(case.definition)
    described = {"purpose": defined.pop("purpose"), "pitfalls": defined.pop("pitfalls")}
    return {
        **defined,
        "profiles": {profile: {"noise": noise, "noise_max": case.noise_max[profile]} for profile, noise in case.noise.items()},
        "tensors": {name: {"dtype": value.dtype.str, "shape": list(value.shape), "sha256": tensor_digest(value)}
                    for name, value in case.tensors().items()},
        **described,
        **({"weights": weights} if (weights := case.weights_entry()) is not None else {}),
    }


def write_manifest(path: Path, spec_version: str, entries: dict[str, dict], on_demand: bool = False,
                   own_config: dict | None = None, partial: bool = False) -> None:
    """Write the manifest via a temporary file renamed into place (a reader never sees half of it).

    ``own_config``: ``{name, config}`` of a folder built for a user's config (GOLDEN.own_config).
    ``partial``: the folder holds only the cases a ``generate --select`` chose (said in the manifest, so a
    missing case is not taken for a deleted one; GOLDEN.manifest).
    """
    document = {"schema": SCHEMA, "spec_version": spec_version, "generator_version": GENERATOR_VERSION,
                "numpy_version": np.__version__, **({"on_demand": True} if on_demand else {}),
                **({"own_config": own_config} if own_config is not None else {}),
                **({"partial": True} if partial and not on_demand else {}), "cases": entries}
    text = yaml.safe_dump(document, sort_keys=False, width=120)
    with atomic_file(Path(path)) as temporary:
        temporary.write_text(text, encoding="utf-8")


def read_manifest(path: Path) -> dict:
    """Read and schema-check golden/manifest.yaml (safe_load only)."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(str(path), "manifest is missing: golden data is not installed with the package; build it with "
                          "`mla-ref golden generate --dir DIR` (10-30 s; the same files as the repository's golden/) and pass --dir DIR or set MLA_REF_GOLDEN_DIR=DIR, "
                          "or run from a clone of the repository (its golden/)", "GOLDEN.manifest")
    try:
        document = _parsed_yaml(path)
    except SpecError as error:  # unreadable, not UTF-8, malformed or an alias bomb
        raise GoldenError(str(path), error.problem, "GOLDEN.manifest") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else document
        raise GoldenError(str(path), f"expected schema {SCHEMA!r}, got {shown(found)}", "GOLDEN.manifest")
    for key in ("spec_version", "generator_version", "numpy_version", "cases"):
        if key not in document:
            raise GoldenError(f"{path.name}: {key}", "required key is missing", "GOLDEN.manifest")
    own = document.get("own_config")
    if own is not None and not (isinstance(own, dict) and isinstance(own.get("name"), str) and isinstance(own.get("config"), dict)):
        raise GoldenError(f"{path.name}: own_config", "expected a mapping with name (str) and config (mapping)", "GOLDEN.manifest")
    if not isinstance(document["cases"], dict):
        raise GoldenError(f"{path.name}: cases", "expected a mapping case id -> entry", "GOLDEN.manifest")
    for case_id, entry in document["cases"].items():
        check_entry(case_id, entry)
    return document


def _parsed_yaml(path: Path) -> Any:
    """``read_yaml(path)``, parsed once per content: the manifest is ~0.6 MB of YAML (half a second to parse) and every
    ``check`` and every case of the pytest plugin reads it. Keyed by the sha256 of the bytes, so an edited file is parsed
    again; each call returns its own copy, which the caller may change."""
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_YAML_BYTES else None
    except OSError:
        data = None
    if data is None:
        return read_yaml(path)  # its SpecError names the file and why it is refused (too large) or cannot be read
    digest = hashlib.sha256(data).digest()
    if digest not in _parsed:
        document = read_yaml(path)
        if hashlib.sha256(path.read_bytes()).digest() != digest:  # changed while it was parsed: keep nothing
            return document
        while len(_parsed) >= PARSED_KEPT:
            del _parsed[next(iter(_parsed))]
        _parsed[digest] = document
    return _fresh_copy(_parsed[digest])


def _fresh_copy(value: Any) -> Any:
    """A copy of parsed YAML whose mappings and lists share nothing with ``value`` (scalars are immutable)."""
    if isinstance(value, dict):
        return {key: _fresh_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_fresh_copy(item) for item in value]
    return value


def check_entry(case_id: str, entry) -> None:
    """One case entry has every key with the right type, and its file name is the id's."""
    from .cases import check_case_id
    check_case_id(case_id)
    if not isinstance(entry, dict):
        raise GoldenError(case_id, "manifest entry is not a mapping", "GOLDEN.manifest")
    for key, kind in CASE_KEYS.items():
        if not isinstance(entry.get(key), kind):
            raise GoldenError(f"{case_id}: {key}", f"expected {kind.__name__}, got {type(entry.get(key)).__name__}", "GOLDEN.manifest")
    if entry["file"] != file_name(case_id):
        raise GoldenError(f"{case_id}: file", f"expected {file_name(case_id)!r}, got {entry['file']!r}", "GOLDEN.manifest")
    if "weights" in entry:
        for key, kind in RECIPE_KEYS.items():
            if not isinstance(entry["weights"], dict) or not isinstance(entry["weights"].get(key), kind):
                raise GoldenError(f"{case_id}: weights.{key}", f"expected {kind.__name__} (the recipe that rebuilds the weights)", "GOLDEN.manifest")
    for name, tensor in entry["tensors"].items():
        for key, kind in TENSOR_KEYS.items():
            if not isinstance(tensor, dict) or not isinstance(tensor.get(key), kind):
                raise GoldenError(f"{case_id}: tensors.{name}.{key}", f"expected {kind.__name__}", "GOLDEN.manifest")
