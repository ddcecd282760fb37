"""Write docs/conventions.md from the spec YAML: ``python docs/make_conventions.py``.

The page lists every place where public implementations disagree (the config switches
with choices, and the ``conventions`` of each spec section) and, for each golden case,
the bug it targets. tests/test_docs.py fails when the committed page differs from what
this script writes, so the page cannot drift from the spec.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mla_ref.config import field_specs
from mla_ref.spec import load_spec_file, spec_dir, spec_version

PAGE = Path(__file__).resolve().parent / "conventions.md"
SWITCHES = ("rope_layout", "yarn_activation", "yarn_truncate", "mscale", "mscale_all_dim", "group_score_rule", "group_mask_fill",
            "topk_norm_rule", "topk_norm_epsilon", "norm_topk_prob", "scoring_func", "topk_method", "mtp_concat_order",
            "mtp_hidden_source", "mtp_rope_position")


def _one_line(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render() -> str:
    lines = [f"# Conventions and pitfalls (generated from spec {spec_version()})", "",
             "Where public implementations of DeepSeek MLA, MoE and MTP disagree, the spec picks one behaviour and names the",
             "others. This page is written by `docs/make_conventions.py` from `spec/*.yaml`; do not edit it by hand.", "",
             "## Switches: what the spec chose, and how to get the alternatives", "",
             "| config field | default | choices | meaning |", "|---|---|---|---|"]
    fields = field_specs()
    for name in SWITCHES:
        if name in fields:
            spec = fields[name]
            choices = ", ".join(map(str, spec.get("choices", []))) or spec["type"]
            lines.append(f"| `{name}` | `{spec.get('default')}` | {choices} | {_one_line(spec.get('meaning', ''))} |")
    lines += ["", "Switch one with `config.replace(field=value)` or in a preset / config dict.", ""]
    for path in sorted(spec_dir().glob("*.yaml")):
        data = load_spec_file(path.name)
        conventions = data.get("conventions")
        if not isinstance(conventions, dict):
            continue
        lines += [f"## `spec/{path.name}` conventions", "", "| topic | convention |", "|---|---|"]
        lines += [f"| {topic} | {_one_line(text)} |" for topic, text in conventions.items()]
        lines.append("")
    lines += ["## Golden cases and the bugs they target", "", "| case | steps | purpose | pitfalls |", "|---|---|---|---|"]
    for case in load_spec_file("golden.yaml")["cases"]:
        steps = f"{case['steps'][0]}-{case['steps'][-1]}" if len(case["steps"]) > 2 else ", ".join(case["steps"])
        pitfalls = "; ".join(map(str, case.get("pitfalls", [])))
        lines.append(f"| `{case['id']}` | {steps} | {_one_line(case.get('purpose', ''))} | {_one_line(pitfalls)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE
    target.write_text(render(), encoding="utf-8")
