"""Which golden cases a check runs, and a refusal wherever it would check nothing (spec/golden.yaml checker.nothing_checked).

One selection for the CLI, the pytest plugin and the API: ``select`` is a glob or a substring
of a case id, ``step`` a spec step id the case covers, ``level`` kernel | layer | model. An
unknown step, a filter that matches no case, an adapter without any entry point of the
protocol, a selection none of whose cases the adapter can run, and a waiver that does not
name specific cases are each an ``InputError``.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Mapping

from ..errors import InputError
from .protocol import entry_points


def matches(case_id: str, pattern: str) -> bool:
    """A case id pattern: a glob (``moe.route*``) or a substring (``tiny-yarn``)."""
    return fnmatch.fnmatch(case_id, pattern) or pattern in case_id


def select_cases(cases: Mapping[str, dict], select: str | None = None, step: str | None = None, level: str | None = None) -> list[str]:
    """The ids of ``cases`` (a manifest's) that every given filter keeps; an InputError naming the filter that keeps none."""
    chosen = list(cases)
    if select:
        chosen = [case_id for case_id in chosen if matches(case_id, select)]
        if not chosen:
            raise InputError("select", f"{select!r} matches no golden case (a glob or a substring of a case id; ids look like "
                             f"{_examples(cases)})", "GOLDEN.select")
    if step:
        from ..explain import all_steps
        known = all_steps()
        if step not in known:
            nearest = difflib.get_close_matches(step, list(known), n=3, cutoff=0.5)
            raise InputError("step", f"unknown step id {step!r}" + (f"; nearest: {nearest}" if nearest else ""), "GOLDEN.select")
        kept = [case_id for case_id in chosen if step in cases[case_id]["steps"]]
        if not kept:
            raise InputError("step", f"no {'selected ' if select else ''}golden case covers {step}", "GOLDEN.select")
        chosen = kept
    if level:
        kept = [case_id for case_id in chosen if cases[case_id]["level"] == level]
        if not kept:
            levels = sorted({cases[case_id]["level"] for case_id in chosen})
            raise InputError("level", f"no selected golden case is at level {level!r} (the selection has {levels})", "GOLDEN.select")
        chosen = kept
    return chosen


def _examples(cases: Mapping[str, dict]) -> str:
    ids = list(cases)
    return ", ".join(repr(case_id) for case_id in ids[:: max(1, len(ids) // 3)][:3])


def defined_entry_points(adapter: Any) -> list[str]:
    """The protocol's entry points the adapter defines (callable attributes)."""
    return [name for name in entry_points() if callable(getattr(adapter, name, None))]


def nearest_entry_points(adapter: Any) -> dict[str, str]:
    """The adapter's public callables that look like a misspelled entry point: name -> entry point."""
    known = list(entry_points())
    nearest = {}
    for name in dir(adapter):
        if name.startswith("_") or name in known or not callable(getattr(adapter, name, None)):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        if close:
            nearest[name] = close[0]
    return nearest


def require_runnable(adapter: Any, adapter_name: str, cases: Mapping[str, dict], chosen: list[str], profile: str) -> None:
    """An InputError unless the adapter defines an entry point and at least one chosen case can run under ``profile``."""
    defined = defined_entry_points(adapter)
    if not defined:
        guesses = nearest_entry_points(adapter)
        hint = ("; did you mean " + ", ".join(f"{name} -> {entry}" for name, entry in guesses.items())) if guesses else ""
        raise InputError("adapter", f"{adapter_name} defines none of the entry points of spec/golden.yaml "
                         f"({', '.join(entry_points())}){hint}", "GOLDEN.adapter")
    needed = sorted({cases[case_id]["entry_point"] for case_id in chosen})
    runnable = [case_id for case_id in chosen if cases[case_id]["entry_point"] in defined]
    if not runnable:
        raise InputError("adapter", f"none of the {len(chosen)} selected cases can run: they need {needed}, {adapter_name} "
                         f"defines {defined}", "GOLDEN.select")
    if not any(profile in cases[case_id]["profiles"] for case_id in runnable):
        raise InputError("profile", f"none of the {len(runnable)} selected cases the adapter can run has a {profile!r} profile",
                         "GOLDEN.select")


def check_waivers(waivers: Mapping[str, str], cases: Mapping[str, dict]) -> None:
    """Every waiver names specific cases, with a reason: a glob matching at least one case of the manifest and not all of them."""
    for pattern, reason in waivers.items():
        if not isinstance(pattern, str) or not isinstance(reason, str) or not reason.strip():
            raise InputError(f"waiver {pattern!r}", f"expected a case-id glob mapped to a reason, got {reason!r}", "GOLDEN.waivers")
        waived = [case_id for case_id in cases if fnmatch.fnmatch(case_id, pattern)]
        if not waived:
            raise InputError(f"waiver {pattern!r}", "matches no golden case (a stale waiver waives nothing)", "GOLDEN.waivers")
        if len(waived) == len(cases) and any(wildcard in pattern for wildcard in "*?["):
            raise InputError(f"waiver {pattern!r}", f"matches every one of the {len(cases)} golden cases: a waiver names the "
                             "specific cases it excuses", "GOLDEN.waivers")
