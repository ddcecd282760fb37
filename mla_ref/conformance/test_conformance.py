"""The conformance suite as pytest tests: ``MLA_REF_ADAPTER=my_module pytest --pyargs mla_ref.conformance``.

``MLA_REF_PROFILE`` picks the precision profile (default: the adapter's PROFILE, else fp32),
``MLA_REF_SELECT`` a case id pattern (a glob or a substring, as ``mla-ref check --select``),
``MLA_REF_STEP`` / ``MLA_REF_LEVEL`` as ``--step`` / ``--level``, ``MLA_REF_GOLDEN_DIR`` the
golden folder. One test per golden case; a case whose entry point the adapter lacks is
skipped, and says so; so is a case the adapter declares unsupported
(``mla_ref.Unsupported``), with its reason. A run that would check nothing (no adapter named, a missing or
tampered golden folder, a selection matching no case, an adapter without any entry point)
fails ``test_the_selection_checks_something`` instead of passing on an empty parameter set.
"""

from __future__ import annotations

import os

import pytest

from mla_ref.conformance.check import load_adapter, run_case
from mla_ref.conformance.selection import require_runnable, select_cases
from mla_ref.errors import MlaRefError
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.integrity import require_manifest_matches_spec
from mla_ref.golden.manifest import read_manifest

ADAPTER = os.environ.get("MLA_REF_ADAPTER")


def _plan() -> tuple[object, str, list[str], str]:
    """The adapter, the profile and the case ids to run, or an empty list and why nothing can run."""
    if not ADAPTER:
        return None, "", [], "set MLA_REF_ADAPTER to the adapter module (name, .py path or module:attribute) to check"
    try:
        adapter = load_adapter(ADAPTER)
        profile = os.environ.get("MLA_REF_PROFILE") or getattr(adapter, "PROFILE", None) or "fp32"
        path = default_golden_dir() / "manifest.yaml"
        manifest = read_manifest(path)
        require_manifest_matches_spec(manifest, path)
        chosen = select_cases(manifest["cases"], os.environ.get("MLA_REF_SELECT"), os.environ.get("MLA_REF_STEP"),
                              os.environ.get("MLA_REF_LEVEL"))
        require_runnable(adapter, ADAPTER, manifest["cases"], chosen, profile)
    except MlaRefError as error:
        return None, "", [], str(error)
    return adapter, profile, chosen, ""


ADAPTER_MODULE, PROFILE, CASE_IDS, PROBLEM = _plan()


def test_the_selection_checks_something():
    if PROBLEM:
        pytest.fail(f"nothing to check: {PROBLEM}", pytrace=False)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_golden_case(case_id):
    directory = default_golden_dir()
    entry = read_manifest(directory / "manifest.yaml")["cases"][case_id]
    result = run_case(ADAPTER_MODULE, directory, case_id, entry, PROFILE, ADAPTER)
    if result.status in ("skip", "unsupported"):
        pytest.skip(f"{result.status}: {result.reason}")
    detail = "\n".join([result.reason, *result.diagnosis, *result.warnings, f"first divergent step: {result.first_divergent_step}",
                        result.repro])
    assert result.status == "pass", detail
