"""Shared helpers: configs, weights and random inputs for the MLA tests."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from mla_ref.config import load_preset, preset_names
from mla_ref.golden.generate import default_golden_dir
from mla_ref.spec import read_yaml
from mla_ref.weights import generate_attention_weights

TINY_PRESETS = [name for name in preset_names() if name.startswith("tiny")]
BIG_PRESETS = [name for name in preset_names() if not name.startswith("tiny")]


@functools.lru_cache(maxsize=None)
def preset(name: str):
    return load_preset(name)


@functools.lru_cache(maxsize=None)
def _weights(name: str, seed: int):
    return generate_attention_weights(preset(name), seed=seed)


def attention_weights(name: str, seed: int = 0) -> dict:
    """Attention weights of a preset (cached; a fresh dict each call)."""
    return dict(_weights(name, seed))


def hidden_states(config, batch: int, seq: int, seed: int = 0, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, config.hidden_size)).astype(dtype)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (0 for two zero arrays)."""
    scale = float(np.max(np.abs(expected), initial=0.0))
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    return diff / scale if scale else diff


@pytest.fixture(params=TINY_PRESETS)
def tiny_name(request) -> str:
    return request.param


@pytest.fixture
def golden_copy(tmp_path):
    """A copy of the committed golden folder that a test may edit."""
    target = tmp_path / "golden"
    shutil.copytree(default_golden_dir(), target)
    return target


def edit_manifest(folder: Path, change) -> None:
    """Edit a golden folder's manifest by hand, as a user (or an attacker) would: ``change(document)``, then write it back.

    libyaml's loader (read_yaml) and dumper where present: the committed manifest is 0.6 MB, 4 s in pure-Python YAML."""
    path = Path(folder) / "manifest.yaml"
    document = read_yaml(path)
    change(document)
    path.write_text(yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, width=120),
                    encoding="utf-8")


@pytest.fixture(scope="module")
def manifest_parsed_once():
    """check() reads and copies golden/manifest.yaml on every call: for a module of many single-case checks, read it once
    (the file does not change during a run). Modules ask for it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    from mla_ref.conformance import check as check_module
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(check_module, "read_manifest", functools.lru_cache(maxsize=None)(check_module.read_manifest))
        yield
