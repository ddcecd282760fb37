"""Paper equation numbers cited by the spec, the step docstrings and docs/ agree with the reports.

The expected numbers are typed in from the reports themselves, not from our own files:
DeepSeek-V2 report (arXiv 2405.04434), section 2.1: eq. 9 c^KV = W^DKV h, 10 k^C = W^UK c^KV,
11 v^C = W^UV c^KV, 12 c^Q = W^DQ h, 13 q^C = W^UQ c^Q, 14 q^R = RoPE(W^QR c^Q),
15 k^R = RoPE(W^KR h), 16 q = [q^C ; q^R], 17 k = [k^C ; k^R], 18 the softmax-weighted sum of
v^C, 19 u = W^O o. DeepSeek-V3 report (arXiv 2412.19437), section 2.1.1: eq. 1 c^KV, 2 k^C,
3 k^R, 4 k = [k^C ; k^R], 5 v^C, 6 c^Q, 7 q^C, 8 q^R, 9 q = [q^C ; q^R], 10 attention, 11 u.
A wrong number in any of the three places fails here (issue 18: the decoupled-RoPE steps were
off by one or two).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mla_ref.spec import resolve_function, step_by_id

# step id -> (V2 report equations, V3 report equations) the step computes
EXPECTED = {
    "MLA.1": ({12}, {6}),
    "MLA.2": ({13, 14}, {7, 8}),
    "MLA.3": ({9, 15}, {1, 3}),
    "MLA.4": ({14, 15}, {3, 8}),
    "MLA.6": ({10, 11}, {2, 5}),
    "MLA.7": ({16, 17}, {4, 9}),
    "MLA.9": ({18}, {10}),
    "MLA.12": ({19}, {11}),
    "ROPE.6": ({14, 15}, set()),
}

DOCS = Path(__file__).resolve().parent.parent / "docs"


def cited(text: str, report: str) -> set[int]:
    """Equation numbers after ``V2R eq.`` / ``V2 eqs.`` (ranges ``14-15`` expanded), for report 'V2' or 'V3'."""
    numbers: set[int] = set()
    for match in re.finditer(rf"{report}R? eqs?\. ((?:\d+(?:-\d+)?(?:, )?)+)", text):
        for part in match.group(1).strip(", ").split(", "):
            low, _, high = part.partition("-")
            numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def test_cited_parses_lists_and_ranges():
    assert cited("V2R eq. 13, 14; V3R eq. 7-8", "V2") == {13, 14}
    assert cited("V2R eq. 13, 14; V3R eq. 7-8", "V3") == {7, 8}
    assert cited("(V2 eqs. 10-11)", "V2") == {10, 11}


@pytest.mark.parametrize("step_id", sorted(EXPECTED))
def test_spec_and_docstring_cite_the_report_equations(step_id):
    v2, v3 = EXPECTED[step_id]
    step = step_by_id(step_id)
    first_line = resolve_function(step["function"]).__doc__.strip().splitlines()[0]
    for where, text in (("spec paper:", step["paper"]), ("docstring", first_line)):
        assert cited(text, "V2") == v2, f"{step_id} {where} {text!r}: V2 report eqs. {sorted(v2)} expected"
        assert cited(text, "V3") == v3, f"{step_id} {where} {text!r}: V3 report eqs. {sorted(v3)} expected"


def test_docs_cite_the_decoupled_rope_equations_right():
    """docs/mla.md names the concatenation and the rope projections by their V2 numbers."""
    text = (DOCS / "mla.md").read_text()
    assert "V2 eqs. 16-17" in text and "V2 eqs. 14-15" in text
    assert cited(text, "V2") <= set(range(9, 20)), "docs/mla.md cites a V2 equation outside section 2.1 (eqs. 9-19)"


@pytest.mark.parametrize("page", ["mla.md", "moe.md", "mtp.md"])
def test_docs_cite_only_sections_the_reports_have(page):
    """The V3 report's section 2.1 has subsections 2.1.1 and 2.1.2 only; V2's 2.1 has 2.1.1-2.1.4, 2.2 has 2.2.1-2.2.4."""
    text = (DOCS / page).read_text()
    assert not re.search(r"V3[^\n.]{0,40}2\.1\.[3-9]", text), f"{page} cites a V3 report section 2.1.3 or later, which does not exist"
