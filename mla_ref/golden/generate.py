"""``mla-ref golden generate`` and ``mla-ref golden verify``: write every case, and rebuild and compare them."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..errors import GoldenError, InputError, shown
from ..precision import UNIT_ROUNDOFF
from ..spec import spec_dir, spec_version
from ..trace import arithmetic, profile as trace_profile
from .cases import build_case, case_definitions, file_name, folder_definitions, own_config_name, stored_recipe_weights
from .integrity import definition_differences
from .manifest import case_entry, read_manifest, write_manifest
from .storage import TEMPORARY_MARK, make_folder, read_npz, tensor_digest, write_npz

# A float64 tensor rebuilt with another summation order (BLAS kernel, threads) moves by a few units of float64
# roundoff of its conditioning-magnified size: 64 u x max(|x| + rms(x), e / u_p), e the largest error of the
# case's emulation of profile p (fp32 first), u_p its unit roundoff. Measured (spec 0.3.0, every coretype from
# Prescott to Cooperlake, 1 and 2 threads): at most 26 u of e / u_fp32 (mla.core.big, large logits, 210 u of |x| + rms).
FLOAT64_ULPS = 64
CONDITIONING_PROFILES = ("fp32", "tf32", "bf16", "fp16", "fp8")  # whose largest error measures a tensor's conditioning, first recorded wins
# Float64 tensors no profile emulates, measured by the tensor they are computed from: the inputs the reference
# computed, by the output computed the same way at later positions (larger RoPE angles); a margin (TOLERANCE.4),
# a difference of two of the scores it is taken from, by those scores (counted twice).
MEASURED_BY = {"input:cache_rows": ("output:rows", 1.0), "margin:tokens": ("output:logits", 2.0),
               "margin:drafts": ("output:logits", 2.0), "margin:expert_ids": ("step:MOE.6:masked", 2.0),
               "margin:groups": ("step:MOE.4:group_scores", 2.0), "margin:indices": ("step:DSA.9:masked_scores", 2.0)}
EMULATED_ULPS = 4  # an emulated tensor, in units of its format: measured bitwise equal across kernels, CPUs and NumPy 1.24-2.4
NOISE_RELATIVE = 1e-5  # a recorded noise against the rebuilt one: the truth moves by 2^-29 of the noise; measured <= 2e-7


def _computes_in_float32(profile_name: str, definition: dict) -> bool:
    """TOLERANCE.2 — whether the case's emulation of the profile computes in float32 (kernel and layer entry points only)."""
    return arithmetic(profile_name) == np.float32 and definition["level"] != "model"


def default_golden_dir() -> Path:
    """``$MLA_REF_GOLDEN_DIR``, else ``golden/`` next to ``spec/`` in a checkout, else ``./golden``.

    Golden files are not installed with the package: an installed mla-ref finds them in the
    checkout it runs from.
    """
    configured = os.environ.get("MLA_REF_GOLDEN_DIR")
    if configured:
        return Path(configured)
    beside_spec = spec_dir().parent / "golden"
    return beside_spec if (beside_spec / "manifest.yaml").is_file() else Path.cwd() / "golden"


def default_on_demand_dir() -> Path:
    """``golden-on-demand/`` beside ``golden/``: the on-demand cases (DeepSeek-V3 shapes) are built there, never committed."""
    return default_golden_dir().parent / "golden-on-demand"


def selected(pattern: str | None, on_demand: bool = False, definitions: list[dict] | None = None) -> list[dict]:
    """The definitions (default: spec/golden.yaml's, committed or on demand) whose id matches ``pattern`` (a glob or a substring)."""
    definitions = case_definitions(on_demand) if definitions is None else definitions
    if pattern is None:
        return definitions
    return [d for d in definitions if fnmatch.fnmatch(d["id"], pattern) or pattern in d["id"]]


def generate(directory: Path | None = None, pattern: str | None = None, on_demand: bool = False,
             config: ModelConfig | None = None, progress: Callable[[int, int, str], None] | None = None) -> dict[str, dict]:
    """Build the selected cases, write their ``.npz`` files and the manifest (other entries are kept).

    ``progress(done, total, case_id)`` is called before each case (mla_ref.progress.Progress draws it).

    ``on_demand``: the cases marked on_demand in spec/golden.yaml (DeepSeek-V3 shapes), into
    ``golden-on-demand/`` by default, with a manifest of their own.

    Atomic (spec/golden.yaml GOLDEN.writes): every case is written to a temporary file first;
    only when all are built are they renamed into place, then the manifest (itself via a
    temporary file), so an interrupted run leaves the previous golden folder as it was. A
    manifest that is not mla-ref's, of the other kind (on-demand or not) or listing a case that
    spec/golden.yaml does not define is never overwritten; a pattern selecting nothing is an error.

    ``config`` (GOLDEN.own_config): the committed cases of preset tiny instantiated for a user's
    config, into ``directory`` (required), whose manifest records the config as ``own_config``.
    """
    if config is not None and directory is None:
        raise InputError("dir", "generating for your own config needs --dir: the folder to write", "GOLDEN.own_config")
    directory = Path(directory or (default_on_demand_dir() if on_demand else default_golden_dir()))
    own = None if config is None else {"name": own_config_name(config), "config": config.to_dict(), "skipped": {}}
    universe = case_definitions(on_demand) if own is None else folder_definitions({"own_config": own})
    definitions = selected(pattern, on_demand, universe)
    if not definitions:
        raise InputError("select", f"{shown(pattern)} matches no {'on-demand ' if on_demand else ''}case of spec/golden.yaml", "GOLDEN.select")
    make_folder(directory)
    manifest_path = directory / "manifest.yaml"
    kept = _replaceable_manifest(manifest_path, on_demand, own)  # checked even when every case is rewritten
    entries = kept if pattern else {}
    _remove_stale_temporaries(directory)
    written: list[tuple[Path, Path]] = []
    try:
        for done, definition in enumerate(definitions):
            if progress is not None:
                progress(done, len(definitions), definition["id"])
            try:
                case = build_case(definition)
            except (ValueError, IndexError) as error:  # typed errors included (MlaRefError is a ValueError)
                if own is None:
                    raise
                own["skipped"][definition["id"]] = f"{type(error).__name__}: {shown(str(error), 300)}"
                continue
            target = directory / file_name(case.id)
            written.append((write_npz(target, case.tensors(), atomic=False), target))
            entries[case.id] = case_entry(case)
        for temporary, target in written:
            os.replace(temporary, target)
        written.clear()
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
    ordered = {d["id"]: entries[d["id"]] for d in universe if d["id"] in entries}
    write_manifest(manifest_path, spec_version(), ordered, on_demand, own, partial=own is None and len(ordered) < len(universe))
    return ordered


def _replaceable_manifest(path: Path, on_demand: bool, own_config: dict | None = None) -> dict[str, dict]:
    """The entries of the manifest at ``path`` (none if absent), or GoldenError if generate must not overwrite it."""
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        manifest = read_manifest(path)
    except GoldenError as error:
        raise GoldenError(str(path), f"refusing to overwrite a manifest that is not a readable mla-ref manifest ({error.problem}); "
                          "choose another --dir or remove it", "GOLDEN.writes") from None
    if bool(manifest.get("on_demand", False)) != on_demand:
        kind = "on-demand" if manifest.get("on_demand") else "committed"
        raise GoldenError(str(path), f"refusing to overwrite the manifest of the {kind} cases; choose another --dir", "GOLDEN.writes")
    if _config_of(manifest.get("own_config")) != _config_of(own_config):
        raise GoldenError(str(path), "refusing to overwrite the manifest of cases built for another config "
                          f"({(manifest.get('own_config') or {}).get('name', 'spec/golden.yaml')}); choose another --dir", "GOLDEN.writes")
    unknown = sorted(set(manifest["cases"]) - {d["id"] for d in folder_definitions(manifest)})
    if unknown:
        raise GoldenError(str(path), f"refusing to overwrite a manifest listing cases spec/golden.yaml does not define: {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''}; remove those entries (or the manifest) if they are retired", "GOLDEN.writes")
    return dict(manifest["cases"])


def _config_of(own_config: dict | None) -> tuple | None:
    return None if own_config is None else (own_config["name"], own_config["config"])


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed generate left behind (``.<case>.npz.tmp-<pid>``)."""
    for path in directory.glob(f".*.npz{TEMPORARY_MARK}*"):
        if path.is_file() and not path.is_symlink():
            path.unlink()


@dataclasses.dataclass
class VerifyRow:
    case_id: str
    status: str  # ok | FAIL
    tensors: int = 0
    detail: str = ""


def _close(name: str, stored: np.ndarray, rebuilt: np.ndarray, magnified: float = 0.0) -> str:
    """'' if a rebuilt tensor matches the stored one, else what differs.

    ``magnified``: for a float64 tensor, the size its rounding errors are magnified to (:func:`_magnified_size`).
    """
    if stored.dtype != rebuilt.dtype or stored.shape != rebuilt.shape:
        return f"{name}: stored {stored.dtype} {list(stored.shape)}, rebuilt {rebuilt.dtype} {list(rebuilt.shape)}"
    if stored.dtype.kind != "f":
        return "" if np.array_equal(stored, rebuilt) else f"{name}: integer values differ ({int((stored != rebuilt).sum())} elements)"
    fmt = trace_profile(name.split(":")[1])["storage"] if name.startswith("emulated:") else "fp64"  # fp8 stores bf16
    if fmt == "fp64":
        units = FLOAT64_ULPS * UNIT_ROUNDOFF["fp64"]
    else:
        units, magnified = EMULATED_ULPS * UNIT_ROUNDOFF[fmt], 0.0
    finite = np.isfinite(stored)
    if not np.array_equal(finite, np.isfinite(rebuilt)) or not np.array_equal(stored[~finite], rebuilt[~finite], equal_nan=True):
        return f"{name}: NaN / inf positions differ"
    if not finite.any():
        return ""
    rms = float(np.sqrt(np.mean(np.square(stored[finite]))))
    difference = np.abs(stored[finite] - rebuilt[finite])
    excess = difference - units * np.maximum(np.abs(stored[finite]) + rms, magnified)
    if (excess <= 0).all():
        return ""
    return f"{name}: max difference {float(np.max(difference)):.3e} beyond {units:.1e} relative (of |x| + {rms:.3e}, at least {magnified:.3e})"


def _magnified_size(name: str, recorded: dict, rebuilt: dict) -> float:
    """How large a float64 tensor's rounding errors grow, in units of roundoff: e / u_p (0 if no profile measured it).

    e is the largest error of the case's emulation of the first profile of CONDITIONING_PROFILES
    that measured the tensor (the larger of the manifest's ``noise_max`` and the rebuilt one),
    u_p its unit roundoff: an ill-conditioned tensor (large logits, long sums) magnifies
    every rounding, a float64 one included. ``recorded``: the manifest's ``profiles``;
    ``rebuilt``: the rebuilt case's ``noise_max``.
    """
    key, factor = ("output:" + name.split(":", 2)[2], 1.0) if name.startswith("emulated:") else MEASURED_BY.get(name, (name, 1.0))
    for profile in CONDITIONING_PROFILES:
        measured = [value for value in (recorded.get(profile, {}).get("noise_max", {}).get(key), rebuilt.get(profile, {}).get(key))
                    if value is not None]
        if measured:
            return factor * max(measured) / UNIT_ROUNDOFF[trace_profile(profile)["storage"]]
    return 0.0


def verify(directory: Path | None = None, pattern: str | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> list[VerifyRow]:
    """Rebuild every selected case and compare it with the committed files; also stale, orphan and tampered files."""
    directory = Path(directory or default_golden_dir())
    manifest = read_manifest(directory / "manifest.yaml")
    on_demand = manifest.get("on_demand", False)  # an on-demand folder holds the cases its generate call selected
    rows: list[VerifyRow] = []
    if manifest["spec_version"] != spec_version():
        rows.append(VerifyRow("manifest", "FAIL", detail=f"spec_version {manifest['spec_version']!r}, spec is {spec_version()!r}: regenerate"))
    definitions = folder_definitions(manifest)  # spec/golden.yaml's, or a user's own config's (GOLDEN.own_config)
    on_demand = on_demand or "own_config" in manifest
    defined = {d["id"] for d in definitions}
    for case_id in sorted(set(manifest["cases"]) - defined):
        rows.append(VerifyRow(case_id, "FAIL", detail="orphan: in the manifest but not in spec/golden.yaml"))
    listed = {entry["file"] for entry in manifest["cases"].values()}
    for path in sorted(directory.glob("*.npz")):
        if path.name not in listed:
            rows.append(VerifyRow(path.name, "FAIL", detail="orphan file: not in the manifest"))
    chosen = selected(pattern, on_demand, definitions)
    if pattern and not chosen:
        raise InputError("select", f"{pattern!r} matches no case of spec/golden.yaml (a glob or a substring of a case id, "
                         f"e.g. {definitions[0]['id']!r})", "GOLDEN.select")
    for done, definition in enumerate(chosen):
        case_id = definition["id"]
        if progress is not None:
            progress(done, len(chosen), case_id)
        entry = manifest["cases"].get(case_id)
        if entry is None and (on_demand or manifest.get("partial", False)):
            continue
        if entry is None:
            rows.append(VerifyRow(case_id, "FAIL", detail="stale: defined in spec/golden.yaml but not generated"))
            continue
        rows.append(_verify_case(directory, definition, entry))
    return rows


def _verify_case(directory: Path, definition: dict, entry: dict) -> VerifyRow:
    case_id = definition["id"]
    try:
        stored = read_npz(directory / entry["file"])
    except GoldenError as error:
        return VerifyRow(case_id, "FAIL", detail=str(error))
    problems = definition_differences(definition, entry)
    if set(stored) != set(entry["tensors"]):
        problems.append(f"tensors in the file {sorted(set(stored) ^ set(entry['tensors']))} disagree with the manifest")
    for name, value in stored.items():
        recorded = entry["tensors"].get(name)
        if recorded is not None and tensor_digest(value) != recorded["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file modified)")
    rebuilt_case = build_case(definition)
    rebuilt = rebuilt_case.tensors()
    recipe = rebuilt_case.weights_entry()
    if entry.get("weights") != recipe:
        problems.append(f"weights recipe: manifest {entry.get('weights')}, rebuilt {recipe}")
    if set(rebuilt) != set(stored):
        problems.append(f"rebuilt tensors differ in names: {sorted(set(rebuilt) ^ set(stored))}")
    for name in sorted(set(rebuilt) & set(stored)):
        difference = _close(name, stored[name], rebuilt[name], _magnified_size(name, entry["profiles"], rebuilt_case.noise_max))
        if difference:
            problems.append(difference)
    for profile, noise in rebuilt_case.noise.items():
        recorded = entry["profiles"].get(profile, {})
        deterministic = _computes_in_float32(profile, definition)
        for name, value in noise.items():
            flip = 0.0 if deterministic else max(recorded.get("noise_max", {}).get(name, 0.0), rebuilt_case.noise_max[profile][name])
            if name not in recorded.get("noise", {}) or not _same_noise(recorded["noise"][name], value, flip):
                problems.append(f"noise {profile} {name}: manifest {recorded.get('noise', {}).get(name)}, rebuilt {value}")
                break
    return VerifyRow(case_id, "FAIL" if problems else "ok", len(stored), "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))


def _same_noise(recorded: float, rebuilt: float, flip: float) -> bool:
    """A recorded noise agrees with the rebuilt one: to NOISE_RELATIVE, plus ``flip``.

    An emulation that computes in float32 is the same on every machine (TOLERANCE.2): only
    the truth moves, by 2^-29 of the noise, and ``flip`` is 0. One that computes in float64
    and rounds (bf16, fp16, model level) can round one element the other way when the float64
    value moves: its error there changes by at most the emulation's largest error, ``flip``.
    """
    return abs(recorded - rebuilt) <= NOISE_RELATIVE * max(abs(recorded), abs(rebuilt)) + flip


def export(directory: Path | None, out: Path, pattern: str | None = None) -> int:
    """Write every committed (selected) case as ``<file>.safetensors``, its manifest entry in the metadata.

    Each file is written to a temporary name and renamed into place; ``out`` must be a folder
    (created if missing); a pattern selecting nothing is an error.
    """
    import json
    from .storage import write_safetensors
    directory = Path(directory or default_golden_dir())
    manifest = read_manifest(directory / "manifest.yaml")
    chosen = {case_id: entry for case_id, entry in manifest["cases"].items()
              if not pattern or fnmatch.fnmatch(case_id, pattern) or pattern in case_id}
    if not chosen:
        raise InputError("select", f"{shown(pattern)} matches no case of {directory / 'manifest.yaml'}", "GOLDEN.select")
    make_folder(Path(out))
    for case_id, entry in chosen.items():
        tensors = read_npz(directory / entry["file"], declared=entry["tensors"])
        if "weights" in entry:  # a model-level case stores its weights' recipe: the export holds the weights themselves
            tensors.update({f"weight:{name}": value for name, value in stored_recipe_weights(entry).items()})
        metadata = {"case_id": case_id, "spec_version": manifest["spec_version"], "entry": json.dumps(entry, default=str)}
        write_safetensors(Path(out) / entry["file"].replace(".npz", ".safetensors"), tensors, metadata)
    return len(chosen)
