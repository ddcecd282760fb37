"""``mla-ref golden calibrate``: measure the k of the acceptance rule (spec/tolerance.yaml).

For every golden case and every calibration variant (a correct implementation that rounds
differently from its profile's emulation), the ratio ``||variant - truth|| / ||emulation -
truth||`` per float output. k must exceed the worst ratio of the variants that must pass;
variants marked ``expect: reject`` show how far a wrong precision lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..spec import load_spec_file
from ..trace import Trace
from .cases import build_case, call_reference, case_definitions
from .manifest import read_manifest


def calibrate(pattern: str | None = None, directory: Path | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Rows ``{case, variant, base, tensor, ratio, expect}``, one per case, variant and float output.

    The committed cases, or with ``directory`` the cases its manifest lists (``golden-on-demand/``:
    the DeepSeek-V3 shapes), rebuilt from the spec. ``progress(done, total, case_id)`` before each case.
    """
    variants = {name: spec for name, spec in load_spec_file("tolerance.yaml")["calibration_variants"].items() if name != "doc"}
    if directory is None:
        definitions = case_definitions()
    else:
        manifest = read_manifest(Path(directory) / "manifest.yaml")
        definitions = [d for d in case_definitions(bool(manifest.get("on_demand", False))) if d["id"] in manifest["cases"]]
    definitions = [d for d in definitions if not pattern or pattern in d["id"]]
    rows = []
    for done, definition in enumerate(definitions):
        if progress is not None:
            progress(done, len(definitions), definition["id"])
        case = build_case(definition)
        for name, variant in variants.items():
            base = variant["base"]
            if base not in case.noise:
                continue
            produced = call_reference(case, Trace(name, keep=False))
            for tensor, truth in case.outputs.items():
                noise = case.noise[base].get(f"output:{tensor}")
                if truth.dtype.kind != "f" or not noise:
                    continue
                finite = np.isfinite(truth) & np.isfinite(produced[tensor])
                error = float(np.linalg.norm(np.where(finite, produced[tensor], 0.0) - np.where(finite, truth, 0.0)))
                rows.append({"case": definition["id"], "variant": name, "base": base, "tensor": tensor, "ratio": error / noise,
                             "expect": variant.get("expect", "accept")})
    return rows


def summary(rows: list[dict]) -> str:
    """Worst ratio per variant, and where it occurs."""
    lines = [f"{'variant':18s} {'base':5s} {'expect':7s} {'worst ratio':>12s}  where"]
    for name in sorted({row["variant"] for row in rows}):
        mine = [row for row in rows if row["variant"] == name]
        worst = max(mine, key=lambda row: row["ratio"])
        best = min(mine, key=lambda row: row["ratio"])
        lines.append(f"{name:18s} {worst['base']:5s} {worst['expect']:7s} {worst['ratio']:12.3f}  {worst['case']} {worst['tensor']}"
                     f"  (smallest {best['ratio']:.3f})")
    return "\n".join(lines)
