"""What the wheel and the sdist carry: the sdist holds everything its own test run reads; license and version agree."""

from __future__ import annotations

import os
import subprocess
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


@pytest.mark.slow
def test_the_wheel_builds_golden_data_outside_a_checkout(tmp_path):
    """README "Golden data outside a checkout": from the installed wheel alone, generate --dir, verify and check pass."""
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))],
                   check=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith("MLA_REF_")}
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install

    def mla_ref_command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-P", "-m", "mla_ref", *args], cwd=work, env=env, capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-P", "-c", "import mla_ref; print(mla_ref.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site)), where.stdout
    missing = mla_ref_command("check", "mla_ref.conformance.reference_adapter")
    assert missing.returncode == 3 and "mla-ref golden generate --dir DIR" in missing.stderr, missing.stderr
    assert mla_ref_command("golden", "generate", "--dir", "my-golden").returncode == 0
    verified = mla_ref_command("golden", "verify", "--dir", "my-golden")
    assert verified.returncode == 0 and " 0 failed" in verified.stdout, verified.stdout + verified.stderr
    checked = mla_ref_command("check", "mla_ref.conformance.reference_adapter", "--dir", "my-golden", "--select", "mla.core")
    assert checked.returncode == 0, checked.stdout + checked.stderr
