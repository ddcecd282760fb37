"""The ``mla-ref`` command line: info, golden generate / verify / export, check."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from .config import load_config, preset_names
from .errors import GoldenError, MlaRefError, SpecError
from .info import info_text
from .progress import Progress
from .spec import spec_version

if TYPE_CHECKING:
    from .conformance.check import Report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-ref", description="NumPy reference for DeepSeek MLA, MoE routing and MTP.",
                                     epilog="exit status: 0 ok, 1 a check or verify failed, 2 bad usage or input, 3 golden data "
                                            "missing or invalid, 130 interrupted, 141 stdout closed")
    parser.add_argument("--version", action=_VersionAction)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr (it is drawn only on a terminal)")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the derived constants of a preset or a Hugging Face config.json")
    info.add_argument("config", help=f"a preset ({', '.join(preset_names())}) or a config.json / yaml path")
    info.add_argument("--no-strict", dest="strict", action="store_false",
                      help="load a Hugging Face / official config with unknown keys (listed as a warning) instead of refusing it")

    explain = commands.add_parser("explain", help="print a spec step: equation, shapes for a preset, the implementing function, pitfalls")
    explain.add_argument("step", help="a step id, e.g. MLA.13 or MOE.4")
    explain.add_argument("--preset", default=None, help="config for the shapes (default deepseek-v3, deepseek-v3.2 for DSA steps)")

    golden = commands.add_parser("golden", help="golden tensors: generate, verify, export")
    golden_commands = golden.add_subparsers(dest="golden_command", required=True)
    for name, text in (("generate", "build the cases of spec/golden.yaml and write golden/"),
                       ("verify", "rebuild every committed case and compare (exit 1 on any difference)"),
                       ("export", "write the committed cases in another format"),
                       ("calibrate", "measure correct precision variants against their profile's emulation (derives k)")):
        sub = golden_commands.add_parser(name, help=text, parents=[quiet])
        sub.add_argument("--dir", type=Path, default=None, help="golden folder (default: golden/ next to spec/)" if name != "calibrate"
                         else "calibrate the cases this folder's manifest lists, e.g. golden-on-demand (default: the committed cases)")
        sub.add_argument("--select", default=None, help="case id pattern (glob or substring)")
        if name == "generate":
            sub.add_argument("--config", default=None, help="build the cases of preset tiny for this config instead (a preset name or a "
                             "config.json / yaml path; needs --dir); verify and check then judge against it")
            sub.add_argument("--on-demand", action="store_true",
                             help="the on-demand cases of spec/golden.yaml (DeepSeek-V3 shapes; default folder golden-on-demand/)")
        if name == "export":
            sub.add_argument("--format", choices=["safetensors"], default="safetensors")
            sub.add_argument("--out", type=Path, required=True, help="output folder")

    check = commands.add_parser("check", help="run an adapter on the golden cases (exit 0: every selected case passed; "
                                "1: a case failed; 2: refused, nothing checked: bad option, selection or adapter; 3: bad golden folder)",
                                parents=[quiet])
    check.add_argument("adapter", help="module name (the current directory is searched), dotted module, path to a .py file, "
                                       "any of them with :attribute")
    check.add_argument("--profile", default=None, help="precision profile of spec/tolerance.yaml (default: the adapter's PROFILE, else fp32)")
    check.add_argument("--select", default=None, help="case id pattern (glob or substring)")
    check.add_argument("--step", default=None, help="only cases covering this spec step, e.g. MLA.9")
    check.add_argument("--level", choices=["kernel", "layer", "model"], default=None)
    check.add_argument("--waivers", type=Path, default=None, help="YAML mapping case-id glob -> reason (each must name specific cases)")
    check.add_argument("--report", type=Path, default=None, help="write the JSON report here (spec/schemas/check-report.schema.json)")
    check.add_argument("--isolate", action="store_true", help="call the adapter in a child process per case: a crash or a hang fails "
                       "that case and the run goes on")
    check.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="per-case time limit of an isolated call (implies --isolate; default 600)")
    check.add_argument("--dir", type=Path, default=None, help="golden folder (default: golden/ next to spec/)")

    own = commands.add_parser("check-outputs", help="judge outputs computed on your own config, weights and inputs as a golden case "
                              "is judged (exit 0 pass, 1 fail, 2 bad input)")
    own.add_argument("--entry-point", required=True, help="an entry point of spec/golden.yaml, e.g. mla_prefill")
    own.add_argument("--config", required=True, help=f"a preset ({', '.join(preset_names())}) or a config.json / yaml path")
    own.add_argument("--weights", type=Path, default=None, help=".npz or .safetensors: the entry point's weights (none for kernels)")
    own.add_argument("--inputs", type=Path, required=True, help=".npz or .safetensors: the entry point's array inputs by name")
    own.add_argument("--outputs", type=Path, required=True, help=".npz or .safetensors: the candidate's outputs (and any "
                     "intermediates '<STEP>/<name>')")
    own.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                     help="a scalar argument of the entry point (steps=4, layer=1, causal=true); repeatable")
    own.add_argument("--profile", required=True, help="precision profile of spec/tolerance.yaml")
    own.add_argument("--report", type=Path, default=None, help="write the JSON report here (spec/schemas/check-report.schema.json)")
    return parser


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_GOLDEN = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def exit_code(error: BaseException) -> int:
    """The documented exit status of an error (README, "Exit status"): golden data missing or invalid 3, anything else 2."""
    return EXIT_GOLDEN if isinstance(error, GoldenError) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mla-ref`` console script; returns the exit status.

    Every mla_ref error, and a file that cannot be read or written, ends in one line on stderr;
    Ctrl-C exits 130 and a closed stdout (``mla-ref ... | head``) 141, quietly.
    """
    try:
        args = _parser().parse_args(argv)
        status = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is still caught, not at interpreter exit
        return status
    except MlaRefError as error:
        print(f"mla-ref: error: {error}", file=sys.stderr)
        return exit_code(error)
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as error:
        print(f"mla-ref: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mla-ref: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        print(info_text(load_config(args.config, strict=args.strict)))
        return 0
    if args.command == "explain":
        from .explain import explain
        default = "deepseek-v3.2" if args.step.startswith("DSA.") else "deepseek-v3"
        print(explain(args.step, load_config(args.preset or default)))
        return 0
    if args.command == "golden":
        return _golden(args)
    if args.command == "check-outputs":
        return _check_outputs(args)
    return _check(args)


def _check_outputs(args: argparse.Namespace) -> int:
    from .conformance.check import check_report_path
    from .conformance.own_inputs import check_outputs, parse_arguments, read_tensors
    if args.report:
        check_report_path(args.report)
    weights = read_tensors(args.weights, "--weights") if args.weights else {}
    report = check_outputs(args.entry_point, args.config, weights, read_tensors(args.inputs, "--inputs"),
                           read_tensors(args.outputs, "--outputs"), args.profile, args=parse_arguments(args.arg),
                           name=str(args.outputs))
    _write_report(args.report, report)
    print(report.table())
    return 0 if report.ok else EXIT_FAILED


def _discard_stdout() -> None:
    """After the reader of stdout went away: point stdout at devnull so that the exit flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured): nothing to flush
        pass


def version_text() -> str:
    """The package version, the spec version and those of the golden folder found by default."""
    from .golden.generate import default_golden_dir
    from .golden.manifest import read_manifest
    lines = [f"mla-ref {_package_version()}", f"spec_version {spec_version()}"]
    manifest_path = default_golden_dir() / "manifest.yaml"
    try:
        manifest = read_manifest(manifest_path)
    except GoldenError as error:
        lines.append(f"golden: none usable at {manifest_path.parent} ({error.problem})")
    else:
        stale = "" if str(manifest["spec_version"]) == spec_version() else f", stale: the spec is {spec_version()}"
        lines.append(f"golden {manifest_path.parent}: spec_version {manifest['spec_version']}, "
                     f"generator_version {manifest['generator_version']}, {len(manifest['cases'])} cases{stale}")
    return "\n".join(lines)


def _package_version() -> str:
    try:
        return metadata.version("mla-ref")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        from . import __version__
        return __version__


class _VersionAction(argparse.Action):
    """``--version``: computed when asked (it reads the golden manifest), not on every run."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the package, spec and golden versions")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def _golden(args: argparse.Namespace) -> int:
    from .golden import generate as golden
    if args.golden_command == "generate":
        own = load_config(args.config) if args.config else None
        with Progress(quiet=args.quiet) as progress:
            entries = golden.generate(args.dir, args.select, args.on_demand, own, progress=progress)
        folder = args.dir or (golden.default_on_demand_dir() if args.on_demand else golden.default_golden_dir())
        print(f"wrote {len(entries)} cases and manifest.yaml to {folder}")
        if own is not None:
            from .golden.manifest import read_manifest
            for case_id, reason in read_manifest(Path(folder) / "manifest.yaml")["own_config"]["skipped"].items():
                print(f"skipped {case_id}: {reason}")
        return 0
    if args.golden_command == "verify":
        with Progress(quiet=args.quiet) as progress:
            rows = golden.verify(args.dir, args.select, progress=progress)
        for row in rows:
            print(f"{row.case_id:58s} {row.status:5s} {row.tensors:4d} tensors  {row.detail}")
        failed = sum(row.status != "ok" for row in rows)
        print(f"{len(rows) - failed} passed, {failed} failed")
        return 1 if failed else 0
    if args.golden_command == "calibrate":
        from .golden.calibrate import calibrate, summary
        with Progress(quiet=args.quiet) as progress:
            rows = calibrate(args.select, args.dir, progress=progress)
        print(summary(rows))
        return 0
    count = golden.export(args.dir, args.out, args.select)
    print(f"wrote {count} safetensors files to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .conformance.check import CheckInterrupted, check
    from .errors import InputError
    from .spec import read_yaml
    try:
        waivers = read_yaml(args.waivers) if args.waivers else None
    except SpecError as error:
        raise InputError(f"--waivers {args.waivers}", error.problem, "GOLDEN.adapter") from None
    if waivers is not None and not isinstance(waivers, dict):
        raise InputError(f"--waivers {args.waivers}", "expected a mapping case-id pattern -> reason", "GOLDEN.adapter")
    if args.report:
        from .conformance.check import check_report_path
        check_report_path(args.report)
    try:
        with Progress(quiet=args.quiet) as progress:
            report = check(args.adapter, args.profile, args.select, step=args.step, level=args.level, waivers=waivers,
                           directory=args.dir, progress=progress,
                           isolate=args.isolate, timeout=args.timeout)
    except CheckInterrupted as interrupted:
        _write_report(args.report, interrupted.report)
        print(interrupted.report.table())
        print(f"mla-ref: interrupted after {len(interrupted.report.cases)} of {interrupted.total} cases"
              f"{f' (written to {args.report})' if args.report else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _write_report(args.report, report)  # before the table: a reader that closes stdout early does not lose it
    print(report.table())
    return 0 if report.ok else EXIT_FAILED


def _write_report(path: Path | None, report: Report) -> None:
    if path is not None:
        path.write_text(report.to_json(), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
