"""Peak resident memory of one MLA prefill, run alone in a fresh process (a helper of run.py).

    python benchmarks/peak_memory.py WEIGHTS_DIR T

``WEIGHTS_DIR`` holds the attention weights as ``<name>.npy`` (float32, relative names).
Prints one JSON line: the weights' bytes, the resident set before the prefill, the peak
during the prefill alone (Linux: the high-water mark is reset through /proc/self/clear_refs
after loading the weights) and the peak of the whole process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mla_ref import load_config, mla_forward  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(weights_dir: str, tokens: int) -> dict:
    config = load_config("deepseek-v3")
    weights = {path.stem: np.load(path) for path in sorted(Path(weights_dir).glob("*.npy"))}
    hidden = np.random.default_rng(0).standard_normal((1, tokens, config.hidden_size), dtype=np.float32)
    process_peak_before = _status_kib("VmHWM")
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    output = mla_forward(config, weights, hidden, dtype=np.float32).output
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "weights_bytes": sum(value.nbytes for value in weights.values()),
            "hidden_bytes": hidden.nbytes, "output_bytes": output.nbytes, "rss_before_bytes": before * 1024,
            "prefill_peak_bytes": _status_kib("VmHWM") * 1024,
            "process_peak_bytes": max(process_peak_before, _status_kib("VmHWM")) * 1024, "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
