"""What the wheel and the sdist carry: the sdist holds everything its own test run reads; license and version agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mla_ref

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_sdist_holds_what_the_tests_and_the_readme_use():
    """The suite reads docs/ (doctests, README blocks), examples/, golden/, spec/ and benchmarks/; the README links LICENSE."""
    include = set(_pyproject()["tool"]["hatch"]["build"]["targets"]["sdist"]["include"])
    needed = {"mla_ref", "spec", "tests", "golden", "docs", "examples", "benchmarks", "README.md", "LICENSE", "pyproject.toml"}
    assert needed <= include, f"missing from the sdist: {sorted(needed - include)}"
    assert all((ROOT / name).exists() for name in needed)


def test_license_file_and_metadata_agree():
    project = _pyproject()["project"]
    assert project["license"] == {"text": "MIT"} and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_one_version():
    assert _pyproject()["tool"]["hatch"]["version"]["path"] == "mla_ref/__init__.py"
    assert "version" in _pyproject()["project"]["dynamic"] and mla_ref.__version__.count(".") == 2
