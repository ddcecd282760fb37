"""benchmarks/run.py writes where --out says, anywhere, and leaves the committed results alone unless named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, runpy, sys
from pathlib import Path
bench = runpy.run_path(sys.argv[1], run_name="benchmarks")
outside = Path(sys.argv[2])
print(json.dumps({
    "default": str(bench["arguments"]().parse_args([]).out.resolve()),
    "outside_plot": str(bench["plot_path"](outside)),
    "outside_shown": str(bench["_shown"](outside)),
    "committed_plot": str(bench["plot_path"](Path(sys.argv[1]).with_name("results.md"))),
    "inside_shown": str(bench["_shown"](Path(sys.argv[1]).with_name("x.png"))),
}))
"""


def test_out_outside_the_checkout_and_the_committed_plot(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENBLAS_")}  # run.py would re-execute
    outside = tmp_path / "elsewhere" / "quick.md"
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "benchmarks" / "run.py"), str(outside)],
                          capture_output=True, text=True, env=env, check=True)
    paths = json.loads(done.stdout.strip().splitlines()[-1])
    assert paths["outside_plot"] == str(tmp_path / "elsewhere" / "quick_decode_vs_length.png")
    assert paths["outside_shown"] == str(outside)  # an absolute path, not a crash
    assert paths["committed_plot"] == str(ROOT / "benchmarks" / "decode_vs_length.png")
    assert paths["inside_shown"] == "benchmarks/x.png"


def test_the_default_output_is_git_ignored_not_the_committed_results(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENBLAS_")}
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "benchmarks" / "run.py"), str(tmp_path / "x.md")],
                          capture_output=True, text=True, env=env, check=True)
    default = Path(json.loads(done.stdout.strip().splitlines()[-1])["default"])
    assert default.parent == ROOT / "benchmarks" and default.name != "results.md"
    if (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(default)], cwd=ROOT)
        assert ignored.returncode == 0, f"{default} is not git-ignored"
