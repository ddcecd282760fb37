"""Every shell and Python block of README.md and docs/ runs as written, from a copy of the checkout.

The blocks are extracted (tests/markdown_blocks.py); a marker above a block makes it slow or
skips it with the reason (the install commands, run by CI step 1 itself, and the adapter for a
kernel the reader has). ``mla-ref``, ``pytest`` and ``python`` are this interpreter's, run as
console scripts run (the current directory not on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from markdown_blocks import blocks

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = [block for page in PAGES for block in blocks(page) if block.language in ("bash", "python") and not block.doctest]
NO_CWD = ["-P"] if sys.version_info >= (3, 11) else []
STAND_IN = "from mla_ref.conformance.reference_adapter import *  # noqa: F403 - a stand-in for the reader's adapter\n"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout (what a fresh clone has), and a bin/ with this interpreter's commands first on PATH."""
    folder = tmp_path_factory.mktemp("clone")
    ignored = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist",
                                     "golden-on-demand", "*.egg-info")
    for entry in ROOT.iterdir():
        if entry.is_dir() and not ignored(str(ROOT), [entry.name]):
            shutil.copytree(entry, folder / entry.name, ignore=ignored)
        elif entry.is_file():
            shutil.copy2(entry, folder / entry.name)
    commands = folder / ".bin"
    commands.mkdir()
    flags = " ".join(NO_CWD)
    for name, target in (("python", ""), ("mla-ref", f"{flags} -m mla_ref"), ("pytest", f"{flags} -m pytest -p no:cacheprovider")):
        script = commands / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        script.chmod(0o755)
    return folder


def _environment(checkout: Path) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MLA_REF_") and name != "PYTHONPATH"}
    env["PATH"] = f"{checkout / '.bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.parametrize("block", [pytest.param(block, id=block.id, marks=[pytest.mark.slow] if block.slow else [])
                                   for block in RUNNABLE])
def test_block_runs_as_written(block, checkout):
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    for package in block.requires:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package}")
    for name in block.needs:
        (checkout / name).write_text(STAND_IN)
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.text]
    else:
        command = [sys.executable, *NO_CWD, "-c", block.text]
    result = subprocess.run(command, cwd=checkout, env=_environment(checkout), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{block.id} exited {result.returncode}\n{block.text}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_every_runnable_block_is_run_or_says_why_not():
    """A block with a marker says slow or skip (with a reason); the default suite runs the rest."""
    assert RUNNABLE, "no blocks found"
    for block in RUNNABLE:
        assert block.marker == "" or block.slow or block.skip_reason not in (None, "marked skip"), f"{block.id}: marker {block.marker!r}"
