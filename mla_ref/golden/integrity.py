"""Tamper evidence: a golden folder is what spec/golden.yaml defines and what the generator wrote.

Two checks the checker runs before it believes a truth (GOLDEN.manifest, GOLDEN.storage):
the manifest against the spec (the case set, every field that follows from a case's
definition, its profiles, its weights recipe, the spec version), and every tensor read from a
case file against the manifest (sha256, and the recorded output noise against the stored
emulation). ``mla-ref golden verify`` goes further: it rebuilds every case.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import GoldenError
from ..spec import spec_version
from .cases import apply_noise_from, folder_definitions, noise_l2, noise_largest, profiles_of, weights_recipe
from .manifest import definition_fields
from .storage import tensor_digest

NOISE_RELATIVE = 1e-9  # the recorded noise is recomputed from the same stored tensors: only the summation order may differ
SHOWN = 5  # differences named in one error


def field_differences(path: str, recorded: Any, expected: Any) -> list[str]:
    """Every leaf where ``recorded`` differs from ``expected``, as ``path.key: manifest X, spec Y``."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        return [difference for key in [*expected, *(k for k in recorded if k not in expected)]
                for difference in field_differences(f"{path}.{key}", recorded.get(key), expected.get(key))]
    if recorded != expected or type(recorded) is not type(expected) and not _same_number(recorded, expected):
        return [f"{path}: manifest {recorded!r}, spec {expected!r}"]
    return []


def _same_number(a: Any, b: Any) -> bool:
    """1 and 1.0 are one value (YAML may write either); True and 1 are not."""
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool) and a == b


def definition_differences(definition: dict, entry: Mapping) -> list[str]:
    """What a manifest entry says otherwise than its definition: entry point, args, config, steps..., profiles, weights recipe."""
    problems = [difference for key, expected in definition_fields(definition).items()
                for difference in field_differences(key, entry.get(key), expected)]
    profiles = sorted(entry.get("profiles", {}))
    if profiles != sorted(profiles_of(definition)):
        problems.append(f"profiles: manifest {profiles}, spec {sorted(profiles_of(definition))}")
    recipe = weights_recipe(definition)
    recorded = entry.get("weights")
    recorded_recipe = None if recorded is None else {key: value for key, value in recorded.items() if key != "digest"}
    problems += field_differences("weights", recorded_recipe, recipe)
    return problems


def manifest_differences(manifest: Mapping) -> list[str]:
    """Where a manifest disagrees with spec/golden.yaml: spec version, cases missing or undefined, any case's defined fields."""
    subset = bool(manifest.get("on_demand", False) or manifest.get("partial", False)) or "own_config" in manifest  # these hold the cases their generate call selected
    problems = []
    if manifest["spec_version"] != spec_version():
        problems.append(f"spec_version {manifest['spec_version']!r}, the spec is {spec_version()!r}")
    definitions = {definition["id"]: definition for definition in folder_definitions(dict(manifest))}
    problems += [f"{case_id}: not a case of spec/golden.yaml" for case_id in manifest["cases"] if case_id not in definitions]
    if not subset:
        problems += [f"{case_id}: defined in spec/golden.yaml, missing from the manifest" for case_id in definitions
                     if case_id not in manifest["cases"]]
    for case_id, entry in manifest["cases"].items():
        if case_id in definitions:
            problems += [f"{case_id}: {difference}" for difference in definition_differences(definitions[case_id], entry)]
    return problems


def require_manifest_matches_spec(manifest: Mapping, path: Path) -> None:
    """GoldenError naming what differs, unless the manifest is the one spec/golden.yaml and this spec version define."""
    problems = manifest_differences(manifest)
    if problems:
        more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise GoldenError(str(path), "tampered golden: the manifest does not match spec/golden.yaml: " + "; ".join(problems[:SHOWN])
                          + more + " (mla-ref golden verify shows every difference; mla-ref golden generate rebuilds)", "GOLDEN.manifest")


def verify_case_tensors(entry: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
    """GoldenError unless every tensor of a case file has the manifest's sha256 and the recorded output noise is the stored emulation's."""
    where = entry["file"]
    extra, missing = sorted(set(tensors) - set(entry["tensors"])), sorted(set(entry["tensors"]) - set(tensors))
    if extra or missing:
        raise GoldenError(where, f"tampered golden: tensors not in the manifest {extra}, in the manifest but not in the file {missing}",
                          "GOLDEN.storage")
    for name, value in tensors.items():
        if tensor_digest(value) != entry["tensors"][name]["sha256"]:
            raise GoldenError(f"{where}: {name}", "tampered golden: sha256 differs from the manifest (the file was modified after "
                              "generation; mla-ref golden verify, or regenerate)", "GOLDEN.storage")
    stored_noise: dict[str, dict[str, float]] = {}
    stored_noise_max: dict[str, dict[str, float]] = {}
    for profile, recorded in entry["profiles"].items():
        outputs = [key for key in recorded["noise"] if key.startswith("output:") and f"emulated:{profile}:{key[7:]}" in tensors]
        stored_noise[profile] = {key: noise_l2(tensors[f"emulated:{profile}:{key[7:]}"], tensors[key]) for key in outputs}
        stored_noise_max[profile] = {key: noise_largest(tensors[f"emulated:{profile}:{key[7:]}"], tensors[key]) for key in outputs}
    for profile in entry["profiles"]:  # an intermediate's emulation is not stored: verify rebuilds it
        apply_noise_from(where, profile, stored_noise, stored_noise_max)
    for profile, recorded in entry["profiles"].items():
        for key, stored_value in stored_noise[profile].items():
            for field, recorded_value, computed in (("noise", recorded["noise"].get(key), stored_value),
                                                    ("noise_max", recorded["noise_max"].get(key), stored_noise_max[profile][key])):
                if not _agrees(recorded_value, computed):
                    raise GoldenError(f"{where}: profiles.{profile}.{field}.{key}", f"tampered golden: manifest {recorded_value!r}, "
                                      f"the stored emulation gives {computed!r}", "GOLDEN.manifest")


def _agrees(recorded: Any, computed: float) -> bool:
    return (isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and math.isfinite(recorded)
            and abs(recorded - computed) <= NOISE_RELATIVE * abs(computed) + 1e-300)
