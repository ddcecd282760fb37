"""Helpers for tests that run the checker on one committed golden case with functions as the adapter."""

from __future__ import annotations

import functools
import types

from mla_ref.conformance.check import CaseResult, check, load_case, read_manifest
from mla_ref.conformance.protocol import parameters
from mla_ref.golden.generate import default_golden_dir


def verdict(select: str, profile: str, **functions) -> CaseResult:
    """The checker's verdict on the one committed case ``select`` matches, with ``functions`` (entry points) as the adapter."""
    report = check(types.SimpleNamespace(**functions), profile, select)
    assert len(report.cases) == 1, select
    return report.cases[0]


@functools.lru_cache(maxsize=None)
def case_args(select: str) -> tuple:
    """The positional arguments (protocol order) of the first committed case whose id starts with ``select``."""
    directory = default_golden_dir()
    entry = next(e for case_id, e in read_manifest(directory / "manifest.yaml")["cases"].items() if case_id.startswith(select))
    case = load_case(directory, entry)
    available = {**case["input"], **entry["args"], "config": dict(entry["config"]), "weights": case["weight"]}
    return tuple(available[name] for name in parameters(entry["entry_point"]))
