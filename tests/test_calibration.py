"""k of the acceptance rule separates correct precision variants from a wrong precision (spec/tolerance.yaml derivation)."""

from __future__ import annotations

from mla_ref.conformance.compare import acceptance
from mla_ref.golden.calibrate import calibrate, summary


def test_k_separates_correct_variants_from_a_wrong_precision():
    rows = calibrate()
    k = acceptance()["k"]
    accepted = max(row["ratio"] for row in rows if row["expect"] == "accept")
    worst_per_case: dict[str, float] = {}
    for row in rows:
        if row["expect"] == "reject":  # a case rejects when any of its tensors does
            worst_per_case[row["case"]] = max(worst_per_case.get(row["case"], 0.0), row["ratio"])
    rejected = min(worst_per_case.values())
    assert accepted < k / 1.5, f"a correct variant uses {accepted:.2f} of k = {k}: too little headroom"
    assert rejected > 10 * k, f"the wrong-precision variant lands only {rejected:.2f} x the noise"


def test_calibration_of_selected_cases_and_its_summary():
    rows = calibrate("mla.core.paged/tiny/bs1-")
    assert rows and {row["case"] for row in rows} == {"mla.core.paged/tiny/bs1-seed0"}
    lines = summary(rows).splitlines()
    assert len(lines) == 1 + len({row["variant"] for row in rows})
    worst = max(rows, key=lambda row: row["ratio"])
    assert any(line.startswith(worst["variant"]) and f"{worst['ratio']:.3f}" in line for line in lines[1:])
