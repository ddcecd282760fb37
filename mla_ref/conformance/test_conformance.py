"""The conformance suite as pytest tests: ``MLA_REF_ADAPTER=my_module pytest --pyargs mla_ref.conformance``.

``MLA_REF_PROFILE`` picks the precision profile (default: the adapter's PROFILE, else fp32),
``MLA_REF_SELECT`` a case id pattern, ``MLA_REF_GOLDEN_DIR`` the golden folder. One test per
golden case; a case whose entry point the adapter lacks, or that the adapter declares unsupported
(``mla_ref.Unsupported``), is skipped, and says so.
"""

from __future__ import annotations

import os

import pytest

from mla_ref.conformance.check import load_adapter, run_case
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest

ADAPTER = os.environ.get("MLA_REF_ADAPTER")
pytestmark = pytest.mark.skipif(not ADAPTER, reason="set MLA_REF_ADAPTER to the adapter module to check")


def _case_ids() -> list[str]:
    try:
        cases = read_manifest(default_golden_dir() / "manifest.yaml")["cases"]
    except Exception:  # noqa: BLE001 - without goldens there is nothing to parametrize
        return []
    pattern = os.environ.get("MLA_REF_SELECT")
    return [case_id for case_id in cases if not pattern or pattern in case_id]


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(ADAPTER)


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_case(adapter, case_id):
    directory = default_golden_dir()
    entry = read_manifest(directory / "manifest.yaml")["cases"][case_id]
    profile = os.environ.get("MLA_REF_PROFILE") or getattr(adapter, "PROFILE", None) or "fp32"
    result = run_case(adapter, directory, case_id, entry, profile, ADAPTER)
    if result.status in ("skip", "unsupported"):
        pytest.skip(f"{result.status}: {result.reason}")
    detail = "\n".join([result.reason, *result.diagnosis, f"first divergent step: {result.first_divergent_step}", result.repro])
    assert result.status == "pass", detail
