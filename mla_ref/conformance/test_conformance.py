"""The conformance suite as pytest tests: ``MLA_REF_ADAPTER=my_module pytest --pyargs mla_ref.conformance``.

``MLA_REF_PROFILE`` picks the precision profile (default: the adapter's PROFILE, else fp32),
``MLA_REF_SELECT`` a case id pattern, ``MLA_REF_GOLDEN_DIR`` the golden folder. One test per
golden case; a case whose entry point the adapter lacks is skipped, and says so. A missing or
unreadable manifest, or a selection that matches no case, is a collection error (exit
status 2), never an empty run that passes.
"""

from __future__ import annotations

import functools
import os

import pytest

from mla_ref.conformance.check import load_adapter, run_case
from mla_ref.errors import GoldenError
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest

ADAPTER = os.environ.get("MLA_REF_ADAPTER")
pytestmark = pytest.mark.skipif(not ADAPTER, reason="set MLA_REF_ADAPTER to the adapter module to check")


@functools.lru_cache(maxsize=None)
def _cases() -> dict:
    """The manifest's cases, read once; a missing or broken manifest raises (a collection error, never an empty run)."""
    return read_manifest(default_golden_dir() / "manifest.yaml")["cases"]


def _case_ids() -> list[str]:
    if not ADAPTER:
        return []
    pattern = os.environ.get("MLA_REF_SELECT")
    selected = [case_id for case_id in _cases() if not pattern or pattern in case_id]
    if not selected:
        raise GoldenError("MLA_REF_SELECT", f"{pattern!r} selects none of the {len(_cases())} golden cases", "GOLDEN.manifest")
    return selected


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(ADAPTER)


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_case(adapter, case_id):
    directory = default_golden_dir()
    entry = _cases()[case_id]
    profile = os.environ.get("MLA_REF_PROFILE") or getattr(adapter, "PROFILE", None) or "fp32"
    result = run_case(adapter, directory, case_id, entry, profile, ADAPTER)
    if result.status == "skip":
        pytest.skip(result.reason)
    detail = "\n".join([result.reason, *result.diagnosis, f"first divergent step: {result.first_divergent_step}", result.repro])
    assert result.status == "pass", detail
