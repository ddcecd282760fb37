"""Self-mutation score: plant each bug of catalogue.yaml in a copy of the tree and check that its tests catch it.

Each mutant replaces one exact snippet of a file under mla_ref/ (it must occur exactly once:
otherwise the mutant is STALE, reported and failing the run) and runs the default-suite tests
named for it in a temporary copy of the repository (golden/ linked, not copied), several
mutants at a time. A mutant is killed when those tests fail. The run fails on a stale snippet,
on a survivor not listed with a reason (``survives:``), and on a listed survivor that is killed
(remove its reason). Before the mutants, the named tests must pass on the unmutated copy.

    python tests/self_mutation/run.py [--jobs N] [--check] [NAME ...]

``--check`` only checks that every snippet still matches (no tests run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = Path(__file__).with_name("catalogue.yaml")
COPIED = ("mla_ref", "spec", "tests", "docs", "examples", "pyproject.toml", "README.md")
TIMEOUT_S = 600


def catalogue() -> list[dict]:
    """Every mutant: ``{name, file, find, replace, tests, bug, survives?}``."""
    return yaml.safe_load(CATALOGUE.read_text(encoding="utf-8"))["mutants"]


def stale_reason(mutant: dict, root: Path = ROOT) -> str | None:
    """Why the mutant's snippet cannot be applied to the tree at ``root`` (None: it matches exactly once)."""
    path = root / mutant["file"]
    if not path.is_file():
        return f"{mutant['file']} does not exist"
    count = path.read_text(encoding="utf-8").count(mutant["find"])
    return None if count == 1 else f"its snippet occurs {count} times in {mutant['file']} (expected once): refresh find/replace"


def copy_tree(destination: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, destination / name)
    (destination / "golden").symlink_to(ROOT / "golden")


def run_tests(tree: Path, tests: list[str]) -> tuple[int, str, float]:
    """pytest on ``tests`` in ``tree``, importing mla_ref from there: (exit status, output tail, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("MLA_REF_GOLDEN_DIR", None)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "--no-header", "-o", "console_output_style=classic", *tests]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s", time.perf_counter() - started
    return done.returncode, (done.stdout + done.stderr)[-3000:], time.perf_counter() - started


@dataclasses.dataclass
class Outcome:
    name: str
    verdict: str  # killed, survived, stale, error
    detail: str
    seconds: float = 0.0


def run_mutant(mutant: dict) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="mla-ref-mutant-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        reason = stale_reason(mutant, tree)
        if reason:
            return Outcome(mutant["name"], "stale", reason)
        path = tree / mutant["file"]
        path.write_text(path.read_text(encoding="utf-8").replace(mutant["find"], mutant["replace"]), encoding="utf-8")
        status, output, seconds = run_tests(tree, mutant["tests"])
    if status in (1, 2, -1):  # tests failed, collection / import error, or a hang
        failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return Outcome(mutant["name"], "killed", failed[0] if failed else output.strip().splitlines()[-1], seconds)
    if status == 0:
        return Outcome(mutant["name"], "survived", "every named test passed", seconds)
    return Outcome(mutant["name"], "error", f"pytest exit status {status}: {output.strip()[-500:]}", seconds)


def baseline(mutants: list[dict]) -> str | None:
    """The named tests must pass on an unmutated copy (and import mla_ref from it), or no kill means anything."""
    tests = sorted({test for mutant in mutants for test in mutant["tests"]})
    with tempfile.TemporaryDirectory(prefix="mla-ref-baseline-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        probe = subprocess.run([sys.executable, "-c", "import mla_ref; print(mla_ref.__file__)"], cwd=tree, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(tree)})
        if not probe.stdout.startswith(str(tree)):
            return f"the copy does not import its own mla_ref: {probe.stdout.strip()} {probe.stderr.strip()[-300:]}"
        status, output, _ = run_tests(tree, tests)
    return None if status == 0 else f"the named tests fail on the unmutated tree (exit {status}):\n{output}"


def judged(outcome: Outcome, listed_reason: str | None) -> tuple[str, bool]:
    """The label printed for an outcome, and whether it fails the run (``outcome.detail`` gets the listed reason)."""
    if outcome.verdict == "survived" and listed_reason:
        outcome.detail = f"listed: {listed_reason}"
        return "SURVIVED*", False
    if outcome.verdict == "killed" and listed_reason:
        outcome.detail = f"listed as a survivor but killed: remove its `survives` ({outcome.detail})"
        return "KILLED!", True
    return outcome.verdict.upper(), outcome.verdict != "killed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="only check that every snippet matches once")
    options = parser.parse_args(argv)
    mutants = [m for m in catalogue() if not options.names or m["name"] in options.names]
    stale = {m["name"]: reason for m in mutants if (reason := stale_reason(m))}
    for name, reason in stale.items():
        print(f"STALE     {name}: {reason}", flush=True)
    if options.check:
        print(f"{len(mutants) - len(stale)} of {len(mutants)} mutants apply")
        return 1 if stale else 0
    started = time.perf_counter()
    problem = baseline([m for m in mutants if m["name"] not in stale])
    if problem:
        print(f"ERROR     baseline: {problem}")
        return 1
    print(f"baseline: the named tests pass on the unmutated tree ({time.perf_counter() - started:.0f} s)", flush=True)
    runnable = [m for m in mutants if m["name"] not in stale]
    listed = {m["name"]: m.get("survives") for m in mutants}
    failures, outcomes = len(stale), []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(run_mutant, m) for m in runnable]):
            outcome = future.result()
            outcomes.append(outcome)
            label, failed = judged(outcome, listed[outcome.name])
            failures += failed
            print(f"{label:9s} {outcome.name:40s} {outcome.seconds:6.1f} s  {outcome.detail}", flush=True)
    killed = sum(o.verdict == "killed" for o in outcomes)
    excused = sum(o.verdict == "survived" and bool(listed[o.name]) for o in outcomes)
    print(f"self-mutation score: {killed}/{len(mutants)} killed ({excused} listed survivors, {len(stale)} stale) "
          f"in {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
