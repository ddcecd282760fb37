"""GOLDEN.writes: an interrupted generate leaves the previous golden folder exactly as it was."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mla_ref.golden.generate as golden
from mla_ref.golden.generate import generate
from mla_ref.golden.manifest import read_manifest
from mla_ref.golden.storage import TEMPORARY_MARK, read_npz


def _contents(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir()) if path.is_file()}


def test_an_exception_mid_generate_changes_nothing(golden_copy, monkeypatch):
    before = _contents(golden_copy)
    built = []
    real_build = golden.build_case

    def build_then_interrupt(definition):
        if len(built) == 2:
            raise KeyboardInterrupt
        built.append(definition["id"])
        return real_build(definition)

    monkeypatch.setattr(golden, "build_case", build_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate(golden_copy, "tiny")
    assert len(built) == 2 and _contents(golden_copy) == before  # no temporary left, no case file replaced


def test_a_killed_generate_leaves_a_readable_unchanged_folder(golden_copy):
    before = _contents(golden_copy)
    process = subprocess.Popen([sys.executable, "-c", "import sys; from mla_ref.golden.generate import generate; generate(sys.argv[1])",
                                str(golden_copy)])
    time.sleep(3.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    after = {name: digest for name, digest in _contents(golden_copy).items() if TEMPORARY_MARK not in name}
    assert after == before
    manifest = read_manifest(golden_copy / "manifest.yaml")
    for entry in manifest["cases"].values():
        read_npz(golden_copy / entry["file"], declared=entry["tensors"])


def test_the_next_generate_removes_a_killed_runs_temporaries(golden_copy):
    stale = golden_copy / f".mla.prefill__tiny__seed0.npz{TEMPORARY_MARK}99999"
    stale.write_bytes(b"half a file")
    generate(golden_copy, "mla.prefill/tiny/seed0")
    assert not stale.exists()
