"""One adapter resolver (spec/golden.yaml adapter.loading) for the CLI, the pytest plugin and check()."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mla_ref.conformance import reference_adapter as ref
from mla_ref.conformance.check import load_adapter
from mla_ref.errors import InputError
from mla_ref.golden.generate import default_golden_dir

REPO = Path(__file__).resolve().parent.parent
CORE_CASE = "mla.core.paged/tiny/bs16"


def _write_adapter(folder: Path, module: str) -> Path:
    """A user's adapter module: the reference's core entry point re-exported, and an object holding it."""
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent("""\
        import types
        from mla_ref.conformance.reference_adapter import latent_attention_core
        ADAPTER = types.SimpleNamespace(inner=types.SimpleNamespace(latent_attention_core=latent_attention_core))
    """))
    return path


@pytest.fixture
def bare_cwd(tmp_path, monkeypatch):
    """The current directory is tmp_path and, as under a console script (mla-ref, pytest), not on sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    return tmp_path


def test_module_name_from_the_current_directory(bare_cwd):
    _write_adapter(bare_cwd, "cwd_adapter_a")
    module = load_adapter("cwd_adapter_a")
    assert module.latent_attention_core is ref.latent_attention_core


def test_dotted_module_and_module_attribute(bare_cwd):
    assert load_adapter("mla_ref.conformance.reference_adapter") is ref
    (bare_cwd / "user_pkg_b").mkdir()
    _write_adapter(bare_cwd / "user_pkg_b", "adapter")
    assert load_adapter("user_pkg_b.adapter:ADAPTER.inner").latent_attention_core is ref.latent_attention_core


def test_file_path_with_and_without_attribute(bare_cwd):
    path = _write_adapter(bare_cwd, "file_adapter_c")
    assert load_adapter(str(path)).latent_attention_core is ref.latent_attention_core
    assert load_adapter(f"{path}:ADAPTER").inner.latent_attention_core is ref.latent_attention_core
    assert load_adapter("file_adapter_c.py").latent_attention_core is ref.latent_attention_core  # relative to the cwd


def test_a_file_inside_a_package_is_imported_as_the_package_module(bare_cwd):
    """The README's reference adapter by path (relative imports), and a user's package with a relative import."""
    assert load_adapter(str(REPO / "mla_ref" / "conformance" / "reference_adapter.py")) is ref
    package = bare_cwd / "user_pkg_d"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("PROFILE = 'bf16'\n")
    (package / "adapter.py").write_text("from .helpers import PROFILE\n")
    assert load_adapter("user_pkg_d/adapter.py").PROFILE == "bf16"


def test_failures_are_input_errors_naming_the_adapter(bare_cwd):
    with pytest.raises(InputError, match=r"cannot import 'no_such_adapter_e'.*current directory"):
        load_adapter("no_such_adapter_e")
    with pytest.raises(InputError, match="cannot import 'missing_e.py'"):
        load_adapter("missing_e.py")
    _write_adapter(bare_cwd, "attr_adapter_e")
    with pytest.raises(InputError, match="has no attribute 'NOPE'"):
        load_adapter("attr_adapter_e:NOPE")


def _console_env() -> dict:
    """The golden folder named: an installed (not editable) mla-ref run from tmp_path would not find the checkout's."""
    env = dict(os.environ, MLA_REF_SELECT=CORE_CASE, MLA_REF_ADAPTER="console_adapter_f", MLA_REF_GOLDEN_DIR=str(default_golden_dir()))
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (no current directory on sys.path) needs 3.11")
def test_the_readme_commands_find_a_module_in_the_current_directory(tmp_path):
    """As the console scripts run them (-P: the current directory is not on sys.path)."""
    _write_adapter(tmp_path, "console_adapter_f")
    env = _console_env()
    check = subprocess.run([sys.executable, "-P", "-m", "mla_ref", "check", "console_adapter_f", "--select", CORE_CASE],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "1 passed, 0 failed" in check.stdout, check.stdout + check.stderr
    plugin = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "mla_ref.conformance"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plugin.returncode == 0 and "2 passed" in plugin.stdout, plugin.stdout + plugin.stderr  # the case and the selection check


def test_the_pytest_plugin_without_golden_data_says_how_to_get_it(tmp_path):
    env = dict(os.environ, MLA_REF_ADAPTER="mla_ref.conformance.reference_adapter", MLA_REF_GOLDEN_DIR=str(tmp_path))
    plugin = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "mla_ref.conformance"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plugin.returncode == 1 and "mla-ref golden generate --dir DIR" in plugin.stdout, plugin.stdout


def test_an_adapter_file_that_is_not_python_source_is_refused_naming_it(tmp_path):
    path = tmp_path / "adapter.txt"
    path.write_text("def latent_attention_core(**inputs):\n    return {}\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^adapter: cannot import '{path}': ImportError: cannot load {path} \(GOLDEN.adapter\)$"):
        load_adapter(str(path))
