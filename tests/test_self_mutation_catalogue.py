"""tests/self_mutation/catalogue.yaml stays applicable: every snippet occurs once, every named test exists.

The mutants themselves run in CI's slow step (``python tests/self_mutation/run.py``); this
cheap check makes a stale snippet visible in the default suite as soon as the code moves.
"""

from __future__ import annotations

import pytest

from self_mutation import run as self_mutation

MUTANTS = self_mutation.catalogue()


def test_names_are_unique_and_entries_complete():
    names = [mutant["name"] for mutant in MUTANTS]
    assert len(names) == len(set(names))
    for mutant in MUTANTS:
        assert {"name", "bug", "file", "find", "replace", "tests"} <= set(mutant), mutant["name"]
        assert mutant["file"].startswith("mla_ref/") and mutant["find"] != mutant["replace"], mutant["name"]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[mutant["name"] for mutant in MUTANTS])
def test_every_snippet_applies_and_every_named_test_exists(mutant):
    assert self_mutation.stale_reason(mutant) is None, f"{mutant['name']}: {self_mutation.stale_reason(mutant)}"
    for test in mutant["tests"]:
        path, _, function = test.partition("::")
        source = self_mutation.ROOT / path
        assert source.is_file(), f"{mutant['name']}: no test file {path}"
        assert not function or f"def {function.split('[')[0]}(" in source.read_text(encoding="utf-8"), f"{mutant['name']}: no test {test}"


def test_the_runner_fails_on_stale_snippets_unlisted_survivors_and_listed_survivors_that_die():
    stale = {**MUTANTS[0], "find": MUTANTS[0]["find"] + " # changed since"}
    assert "occurs 0 times" in self_mutation.stale_reason(stale)
    outcome = lambda verdict: self_mutation.Outcome("m", verdict, "")
    assert self_mutation.judged(outcome("killed"), None) == ("KILLED", False)
    assert self_mutation.judged(outcome("survived"), None) == ("SURVIVED", True)
    assert self_mutation.judged(outcome("survived"), "equivalent mutant") == ("SURVIVED*", False)
    assert self_mutation.judged(outcome("killed"), "equivalent mutant") == ("KILLED!", True)
    assert self_mutation.judged(outcome("error"), None) == ("ERROR", True)
