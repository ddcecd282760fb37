"""Line coverage of the default suite, child processes included, as three figures: conformance/, golden/, the math.

Runs ``pytest`` (the default suite, or the arguments given after ``--``) under coverage.py with its
``subprocess`` patch ([tool.coverage.run] in pyproject.toml), so the xdist workers, the ``mla-ref``
commands the tests start, the ``--isolate`` children and the ``pytest --pyargs mla_ref.conformance``
runs count too; then combines the data and prints the covered share of ``mla_ref/conformance/``,
``mla_ref/golden/`` and the math modules (MATH: the modules of the spec's steps; the command line,
the spec loader, input checks, errors, trace hooks and test strategies are not counted), and with
``--files`` each file (``--missing``: and the lines no test ran). Issue 19 asks that the first two
be at least the third; ``--check`` fails the run when they are not.

    python tests/coverage/run.py [--files [--missing]] [--check] [-- PYTEST_ARGS ...]

Needs coverage >= 7.10 (``pip install coverage``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mla_ref"
MATH = ("config.py", "norm.py", "rope.py", "mla.py", "cache.py", "moe.py", "balance.py", "dispatch.py", "mtp.py", "model.py",
        "speculative.py", "weights.py", "precision.py", "fp8.py", "fp8_cache.py", "dsa.py", "dsa_kernel.py", "dsa_cache.py")


def group(path: Path) -> str | None:
    """Which figure a measured file counts in: ``conformance``, ``golden``, ``math`` or None (another module, or not in mla_ref/)."""
    try:
        relative = path.resolve().relative_to(PACKAGE)
    except ValueError:  # a copy of the package in a temporary folder (the self-mutation and packaging tests)
        return None
    if len(relative.parts) == 2 and relative.parts[0] in ("conformance", "golden"):
        return relative.parts[0]
    if len(relative.parts) == 1 and relative.name in MATH:
        return "math"
    return None


def require_coverage() -> None:
    """Exit with how to install it unless coverage.py >= 7.10 (its ``patch = subprocess``) is importable."""
    try:
        import coverage
    except ImportError:
        sys.exit("tests/coverage/run.py needs coverage.py >= 7.10: pip install coverage")
    if tuple(int(part) for part in coverage.__version__.split(".")[:2]) < (7, 10):
        sys.exit(f"tests/coverage/run.py needs coverage.py >= 7.10 (patch = subprocess), found {coverage.__version__}")


def measure(pytest_args: list[str], data_folder: Path) -> dict:
    """Run pytest under coverage, combine every process's data, return coverage.py's JSON report."""
    data_file = data_folder / ".coverage"
    environment = dict(os.environ, COVERAGE_FILE=str(data_file))
    run = [sys.executable, "-m", "coverage", "run", "--rcfile", str(ROOT / "pyproject.toml"), "-m", "pytest", *pytest_args]
    tests = subprocess.run(run, cwd=ROOT, env=environment)
    if tests.returncode not in (0, 1):  # 1: some test failed, still a measurement; others: pytest could not run
        sys.exit(f"pytest exited with status {tests.returncode}")
    report = data_folder / "coverage.json"
    for command in (["combine"], ["json", "-o", str(report), "--include", f"{PACKAGE}/*"]):  # copies of mla_ref elsewhere: left out
        subprocess.run([sys.executable, "-m", "coverage", *command, "--quiet", "--rcfile", str(ROOT / "pyproject.toml")], cwd=ROOT,
                       env=environment, check=True)
    if tests.returncode:
        print(f"(some tests failed: pytest exited with status {tests.returncode}; the figures count what ran)")
    return json.loads(report.read_text(encoding="utf-8"))


def line_ranges(lines: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    ranges: list[list[int]] = []
    for line in sorted(lines):
        if ranges and line == ranges[-1][1] + 1:
            ranges[-1][1] = line
        else:
            ranges.append([line, line])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in ranges)


def figures(report: dict) -> tuple[dict[str, float], dict[str, tuple[str, float, str]]]:
    """Per group and per file: the share of statements run, in percent (and per file, the lines not run)."""
    totals: dict[str, list[int]] = {"conformance": [0, 0], "golden": [0, 0], "math": [0, 0]}
    per_file = {}
    for name, measured in report["files"].items():
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        kind = group(path)
        if kind is None:
            continue
        covered, statements = measured["summary"]["covered_lines"], measured["summary"]["num_statements"]
        totals[kind][0] += covered
        totals[kind][1] += statements
        per_file[str(path.resolve().relative_to(ROOT))] = (kind, 100.0 * covered / statements if statements else 100.0,
                                                            line_ranges(measured["missing_lines"]))
    return {kind: 100.0 * covered / statements for kind, (covered, statements) in totals.items() if statements}, per_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", action="store_true", help="also print each file's figure")
    parser.add_argument("--missing", action="store_true", help="with --files, also the lines no test ran")
    parser.add_argument("--check", action="store_true", help="fail when conformance/ or golden/ is below the math modules")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest after --, default: the default suite")
    options = parser.parse_args()
    require_coverage()
    with tempfile.TemporaryDirectory(prefix="mla-ref-coverage-") as folder:
        report = measure(options.pytest_args or ["-q", "-p", "no:cacheprovider"], Path(folder))
    by_group, by_file = figures(report)
    if options.files:
        for name, (kind, percent, missing) in sorted(by_file.items()):
            print(f"{percent:6.1f}%  {name}" + (f"  missing: {missing}" if options.missing and missing else ""))
    print("coverage of the default suite, child processes included: "
          + ", ".join(f"{kind} {percent:.1f}%" for kind, percent in by_group.items()))
    if options.check and min(by_group["conformance"], by_group["golden"]) < by_group["math"]:
        print("conformance/ or golden/ is covered less than the math modules (issue 19)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
