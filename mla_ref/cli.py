"""The ``mla-ref`` command line: info, golden generate / verify / export, check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_config, preset_names
from .errors import MlaRefError
from .info import info_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-ref", description="NumPy reference for DeepSeek MLA, MoE routing and MTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the derived constants of a preset or a Hugging Face config.json")
    info.add_argument("config", help=f"a preset ({', '.join(preset_names())}) or a config.json / yaml path")
    info.add_argument("--no-strict", dest="strict", action="store_false",
                      help="load a Hugging Face / official config with unknown keys (listed as a warning) instead of refusing it")

    explain = commands.add_parser("explain", help="print a spec step: equation, shapes for a preset, the implementing function, pitfalls")
    explain.add_argument("step", help="a step id, e.g. MLA.13 or MOE.4")
    explain.add_argument("--preset", default="deepseek-v3", help="config for the shapes (default deepseek-v3)")

    golden = commands.add_parser("golden", help="golden tensors: generate, verify, export")
    golden_commands = golden.add_subparsers(dest="golden_command", required=True)
    for name, text in (("generate", "build the cases of spec/golden.yaml and write golden/"),
                       ("verify", "rebuild every committed case and compare (exit 1 on any difference)"),
                       ("export", "write the committed cases in another format"),
                       ("calibrate", "measure correct precision variants against their profile's emulation (derives k)")):
        sub = golden_commands.add_parser(name, help=text)
        sub.add_argument("--dir", type=Path, default=None, help="golden folder (default: golden/ next to spec/)")
        sub.add_argument("--select", default=None, help="case id pattern (glob or substring)")
        if name == "generate":
            sub.add_argument("--on-demand", action="store_true",
                             help="the on-demand cases of spec/golden.yaml (DeepSeek-V3 shapes; default folder golden-on-demand/)")
        if name == "export":
            sub.add_argument("--format", choices=["safetensors"], default="safetensors")
            sub.add_argument("--out", type=Path, required=True, help="output folder")

    check = commands.add_parser("check", help="run an adapter on the golden cases (exit 1 on any failure)")
    check.add_argument("adapter", help="module name, path to a .py file, or module:attribute")
    check.add_argument("--profile", default=None, help="precision profile of spec/tolerance.yaml (default: the adapter's PROFILE, else fp32)")
    check.add_argument("--select", default=None, help="case id pattern (glob or substring)")
    check.add_argument("--step", default=None, help="only cases covering this spec step, e.g. MLA.9")
    check.add_argument("--level", choices=["kernel", "layer", "model"], default=None)
    check.add_argument("--waivers", type=Path, default=None, help="YAML mapping case-id pattern -> reason")
    check.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    check.add_argument("--dir", type=Path, default=None, help="golden folder (default: golden/ next to spec/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mla-ref`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info_text(load_config(args.config, strict=args.strict)))
            return 0
        if args.command == "explain":
            from .explain import explain
            print(explain(args.step, load_config(args.preset)))
            return 0
        if args.command == "golden":
            return _golden(args)
        return _check(args)
    except MlaRefError as error:
        print(f"mla-ref: error: {error}", file=sys.stderr)
        return 2


def _golden(args) -> int:
    from .golden import generate as golden
    if args.golden_command == "generate":
        entries = golden.generate(args.dir, args.select, args.on_demand)
        folder = args.dir or (golden.default_on_demand_dir() if args.on_demand else golden.default_golden_dir())
        print(f"wrote {len(entries)} cases and manifest.yaml to {folder}")
        return 0
    if args.golden_command == "verify":
        rows = golden.verify(args.dir, args.select)
        for row in rows:
            print(f"{row.case_id:58s} {row.status:5s} {row.tensors:4d} tensors  {row.detail}")
        failed = sum(row.status != "ok" for row in rows)
        print(f"{len(rows) - failed} passed, {failed} failed")
        return 1 if failed else 0
    if args.golden_command == "calibrate":
        from .golden.calibrate import calibrate, summary
        print(summary(calibrate(args.select)))
        return 0
    count = golden.export(args.dir, args.out, args.select)
    print(f"wrote {count} safetensors files to {args.out}")
    return 0


def _check(args) -> int:
    from .conformance.check import check
    from .spec import read_yaml
    waivers = read_yaml(args.waivers) if args.waivers else None
    if waivers is not None and not isinstance(waivers, dict):
        print(f"mla-ref: error: {args.waivers}: expected a mapping case-id pattern -> reason", file=sys.stderr)
        return 2
    report = check(args.adapter, args.profile, args.select, step=args.step, level=args.level, waivers=waivers, directory=args.dir)
    print(report.table())
    if args.report:
        args.report.write_text(report.to_json(), encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
