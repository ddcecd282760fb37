"""The fp64 profile accepts an independent float64 implementation whose RoPE uses other exact formulas
(tests/independent_fp64_adapter.py: ``theta ** (-2j/d)``, cos / sin from ``exp(i angle)``), and its allowance follows the
case's conditioning (spec/tolerance.yaml noise_from) rather than a fixed floor."""

from __future__ import annotations

import numpy as np

import independent_fp64_adapter
from mla_ref.conformance.check import check, load_case
from mla_ref.conformance.compare import acceptance, unit_roundoff
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest

ENTRY_POINTS = ("mla_prefill", "mla_extend", "latent_attention_core")


def test_an_independent_float64_implementation_passes_every_case_it_covers():
    report = check(independent_fp64_adapter, "fp64")
    covered = [case for case in report.cases if case.entry_point in ENTRY_POINTS and not case.reason.startswith("case has no ")]  # GC-FP8: fp8 only
    assert report.ok and covered and all(case.status == "pass" for case in covered), report.table()


def test_the_fp64_allowance_follows_the_position():
    """The fp64 noise of q_pe is the fp32 emulation's scaled by u64 / u32: near position 0 it stays under the floor, at
    position 70000 (tiny-yarn) the float32 angles' p x ulp makes it the larger (a fixed floor ignored that)."""
    directory = default_golden_dir()
    manifest = read_manifest(directory / "manifest.yaml")
    over_floor = {}
    for case_id in ("mla.prefill/tiny/seed0", "mla.prefill.yarn/tiny-yarn/seed0"):
        entry = manifest["cases"][case_id]
        noise = entry["profiles"]["fp64"]["noise"]["step:MLA.4:q_pe"]
        assert noise == entry["profiles"]["fp32"]["noise"]["step:MLA.4:q_pe"] * unit_roundoff("fp64") / unit_roundoff("fp32")
        truth = load_case(directory, entry)["step"]["MLA.4/q_pe"]
        over_floor[case_id] = noise / (acceptance("fp64")["floor_units"] * unit_roundoff("fp64") * np.linalg.norm(truth))
    assert over_floor["mla.prefill/tiny/seed0"] < 1 < over_floor["mla.prefill.yarn/tiny-yarn/seed0"], over_floor
