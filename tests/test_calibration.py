"""k of the acceptance rule separates correct precision variants from a wrong precision (spec/tolerance.yaml derivation)."""

from __future__ import annotations

from mla_ref.conformance.compare import acceptance
from mla_ref.golden.calibrate import calibrate


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
