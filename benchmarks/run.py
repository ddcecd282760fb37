"""mla-ref benchmark: the reference against the machine's own matmul rate and against torch (issue 6).

    python benchmarks/run.py                                # full run, about 25 minutes on 2 cores
    python benchmarks/run.py --quick --out /tmp/quick.md    # smoke test, a few minutes
    python benchmarks/run.py --out benchmarks/results.md    # update the committed results (asked for by name)

Every figure is a ratio measured side by side in the same run (absolute times drift on shared
machines): MLA prefill at deepseek-v3 attention shapes against a float32 matmul of comparable
size, numpy against torch on CPU with the same threads, decode per token against the cached
length (naive, absorbed, paged-absorbed), the MoE layer, the peak resident memory of a long
prefill (in a fresh process) and the wall time of the golden commands and the test suite.
Writes the tables to ``--out`` (default benchmarks/results.local.md, git-ignored: the committed
benchmarks/results.md is written only when named) and the plot beside it as
<out stem>_decode_vs_length.png (benchmarks/decode_vs_length.png for the committed results),
if matplotlib imports. Not part of the test suite; needs ``pip install -e ".[bench]"`` (threadpoolctl;
torch and matplotlib are optional: their rows are skipped with a note).

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, when set, are removed for this process only (the run
re-executes itself without them; the timed commands of the last section get them back) and
the table reports the kernel OpenBLAS picked.
"""

from __future__ import annotations

import os
import sys

_OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REMOVED_KEY = "MLA_REF_BENCH_REMOVED_ENV"
if any(name in os.environ for name in _OPENBLAS_OVERRIDES) and "--keep-openblas-env" not in sys.argv:
    removed = ";".join(f"{name}={os.environ[name]}" for name in _OPENBLAS_OVERRIDES if name in os.environ)
    env = {name: value for name, value in os.environ.items() if name not in _OPENBLAS_OVERRIDES}
    env[_REMOVED_KEY] = removed
    os.execve(sys.executable, [sys.executable] + sys.argv, env)  # numpy must load OpenBLAS without them

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mla_ref import (LatentCache, NaiveCache, PagedLatentCache, ffn_forward, generate_attention_weights,  # noqa: E402
                     generate_weights, load_config, mla_forward, route)
from mla_ref.config import cache_values_per_token  # noqa: E402
from mla_ref.moe import moe_weight_names, needed_expert_weight_names  # noqa: E402
from mla_ref.weights import layer_weight_shapes  # noqa: E402

GIB = 1 << 30
TARGETS = {
    "prefill_fraction": 0.70,  # of the float32 matmul rate at T = 2048 and 8192
    "torch_ratio": 1.2,  # numpy time / torch time, prefill and decode
    "moe_fraction": 0.50,  # at 1024 tokens
    "peak_extra_bytes": 3 * GIB,  # over the weights, T = 8192 prefill
    "tests_seconds": 60.0,
    "verify_seconds": 60.0,
}


@dataclasses.dataclass
class Plan:
    prefill_tokens: tuple[int, ...]
    decode_lengths: tuple[int, ...]
    moe_tokens: tuple[int, ...]
    peak_tokens: int
    reps: int
    decode_steps: int
    run_tests: bool


FULL = Plan((512, 2048, 8192), (1024, 4096, 16384, 65536), (1, 64, 1024), 8192, reps=2, decode_steps=5, run_tests=True)
QUICK = Plan((512,), (1024, 4096), (1, 64), 2048, reps=1, decode_steps=2, run_tests=False)


# ---------------------------------------------------------------------------- measuring

def _cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat), 0 where unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    jiffies = [int(value) for value in fields]
    busy = sum(jiffies) - jiffies[3] - (jiffies[4] if len(jiffies) > 4 else 0)  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float = 90.0, window: float = 1.0, busy_cores: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``busy_cores`` cores; returns the seconds waited.

    Two BLAS threads share two cores with whatever else runs: a busy neighbour stalls every
    threaded BLAS call, so each timed call starts in a quiet window.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        used = _cpu_seconds()
        time.sleep(window)
        if _cpu_seconds() - used < busy_cores * window:
            break
    return time.perf_counter() - start


OTHERS: list[float] = []  # others' CPU (cores) during each best timing, for the report


def timed(fn, reps: int, warmup: int = 1) -> tuple[float, object]:
    """Best wall time of ``reps`` calls after ``warmup`` untimed ones (first touches of fresh memory are slow).

    Each timed call starts in a quiet window; the CPU other processes used meanwhile is kept
    for the best call (in cores), so a contended figure shows in the report.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    best, others = float("inf"), 0.0
    for _ in range(reps):
        wait_for_quiet()
        start, machine, own = time.perf_counter(), _cpu_seconds(), time.process_time()
        result = fn()
        seconds = time.perf_counter() - start
        if seconds < best:
            best = seconds
            others = max(0.0, (_cpu_seconds() - machine) - (time.process_time() - own)) / seconds
    OTHERS.append(others)
    return best, result


def matmul_rate(rows: int, inner: int = 7168, cols: int = 4096, reps: int = 3) -> tuple[float, str]:
    """GFLOP/s of a float32 ``[rows, inner] @ [inner, cols]`` (the machine's own rate, best of ``reps``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner), dtype=np.float32)
    b = rng.standard_normal((inner, cols), dtype=np.float32)
    seconds, _ = timed(lambda: a @ b, reps)
    return 2.0 * rows * inner * cols / seconds / 1e9, f"[{rows}, {inner}] @ [{inner}, {cols}]"


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / max(np.linalg.norm(reference), 1e-300))


def load_average() -> str:
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (a large number where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- FLOP counts

def prefill_flops(config, tokens: int) -> tuple[float, float]:
    """(projections, attention) FLOPs of a causal prefill of ``tokens`` from position 0, naive form."""
    c = config
    d, h, n, r, v = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    projections = 2.0 * tokens * (d * c.q_lora_rank + c.q_lora_rank * h * (n + r) + d * (c.kv_lora_rank + r)
                                  + c.kv_lora_rank * h * (n + v) + h * v * d)
    attention = 2.0 * h * (n + r + v) * tokens * (tokens + 1) / 2
    return projections, attention


PREFILL_FORMULA = ("FLOPs = 2T(d·r_q + r_q·h(n+r) + d(r_kv+r) + r_kv·h(n+v) + h·v·d) + 2h(n+r+v)·T(T+1)/2 "
                   "with d = 7168, r_q = 1536, r_kv = 512, h = 128, n = 128, r = 64, v = 128: projections plus "
                   "the causal (visible) query-key pairs of QK^T and PV; the softmax is not counted")
MOE_FORMULA = ("FLOPs = 2N·d·E (router) + 6·d·I·N·K (routed SwiGLU: gate, up, down) + 6·d·(I·n_shared)·N (shared) "
               "with N tokens, d = 7168, E = 256, K = 8, I = 2048, n_shared = 1")


# ---------------------------------------------------------------------------- sections

def environment(threads: int) -> dict:
    from threadpoolctl import threadpool_info
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB, {platform.system()} {platform.release()}",
        "python": platform.python_version(), "numpy": np.__version__, "threads": threads,
        "blas": ", ".join(f"{b.get('internal_api')} {b.get('version')} kernel {b.get('architecture')} ({b.get('num_threads')} threads)" for b in blas) or "unknown",
        "removed_env": os.environ.get(_REMOVED_KEY, ""),
        "load_start": load_average(),
    }
    try:
        import torch
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads set)"
    except ImportError:
        info["torch"] = "not installed: torch rows skipped (pip install torch)"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("nan")


def _torch_mla(config, weights):
    try:
        from torch_mla import TorchMLA
    except ImportError:
        return None
    return TorchMLA(config, weights)


def bench_prefill(config, weights, plan: Plan, torch_mla) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    for tokens in plan.prefill_tokens:
        hidden = rng.standard_normal((1, tokens, config.hidden_size), dtype=np.float32)
        rate, shape = matmul_rate(tokens)
        reps = 1 if tokens >= 8192 else plan.reps
        seconds, result = timed(lambda: mla_forward(config, weights, hidden, dtype=np.float32).output, reps)
        busy = OTHERS[-1]
        projections, attention = prefill_flops(config, tokens)
        row = {"tokens": tokens, "seconds": seconds, "others": busy, "gflop": (projections + attention) / 1e9,
               "gflops": (projections + attention) / seconds / 1e9, "matmul_gflops": rate, "matmul_shape": shape}
        row["fraction"] = row["gflops"] / rate
        if torch_mla is not None:
            torch_seconds, torch_out = timed(lambda: torch_mla.prefill(hidden), reps)
            row.update(torch_seconds=torch_seconds, torch_ratio=seconds / torch_seconds, torch_error=relative_error(torch_out, result))
        log(f"prefill T={tokens}: {seconds:.2f} s, {row['gflops']:.1f} GFLOP/s = {row['fraction']:.0%} of {rate:.1f}"
            + (f"; torch {row['torch_seconds']:.2f} s (numpy/torch {row['torch_ratio']:.2f})" if "torch_seconds" in row else ""))
        rows.append(row)
        del hidden, result
    return rows


def _decode_caches(config, length: int, capacity: int, rng, kinds: tuple[str, ...]):
    """Caches holding ``length`` random tokens, with room for ``capacity`` (appends then write in place)."""
    batch = np.array([length])
    caches = {}
    latent_rows = rng.standard_normal((1, length, config.latent_cache_width), dtype=np.float32)
    if "absorbed" in kinds:
        caches["absorbed"] = LatentCache.empty(config, 1, np.float32, capacity=capacity).append(latent_rows, batch)
    if "paged-absorbed" in kinds:
        paged = PagedLatentCache.empty(config, 1, capacity, block_size=64, shuffle_seed=0, dtype=np.float32)
        caches["paged-absorbed"] = paged.append(latent_rows, batch)
    if "naive" in kinds:
        heads = config.num_attention_heads
        naive = NaiveCache.empty(config, 1, np.float32, capacity=capacity)
        keys = rng.standard_normal((1, length, heads, config.qk_head_dim), dtype=np.float32)
        values = rng.standard_normal((1, length, heads, config.v_head_dim), dtype=np.float32)
        caches["naive"] = naive.append(keys, values, batch)
    return caches, latent_rows


def _cache_bytes(cache, length: int) -> int:
    """Bytes of the arrays that hold the ``length`` cached tokens."""
    if isinstance(cache, LatentCache):
        return cache.key_rows()[:, :length].nbytes
    if isinstance(cache, PagedLatentCache):
        blocks = cache.block_table[0, : -(-length // cache.block_size)]
        return int(cache.blocks[blocks].nbytes)
    keys, values = cache.keys_values()
    return keys[:, :length].nbytes + values[:, :length].nbytes


def bench_decode(config, weights, plan: Plan, torch_mla) -> list[dict]:
    rows = []
    formula = cache_values_per_token(config)
    itemsize = np.dtype(np.float32).itemsize
    rng = np.random.default_rng(2)
    for length in plan.decode_lengths:
        steps = plan.decode_steps
        naive_bytes = length * formula["naive"] * itemsize
        kinds = ("naive", "absorbed", "paged-absorbed")
        skipped_naive = naive_bytes * 2.2 + 2 * GIB > mem_available()  # the cache, the random keys / values it is filled from
        if skipped_naive:
            kinds = kinds[1:]
        caches, latent_rows = _decode_caches(config, length, length + steps + 2, rng, kinds)
        tokens = rng.standard_normal((steps + 1, 1, 1, config.hidden_size), dtype=np.float32)
        if skipped_naive:
            rows.append({"length": length, "form": "naive", "skipped": f"needs {naive_bytes / GIB:.1f} GiB for the cache "
                         f"({formula['naive']} values per token), {mem_available() / GIB:.1f} GiB available"})
        for form, cache in caches.items():
            measured = _cache_bytes(cache, length)
            times = []
            for step in range(steps + 1):  # the first step is a warm-up
                wait_for_quiet(max_wait=30)
                start = time.perf_counter()
                cache = mla_forward(config, weights, tokens[step], cache=cache, dtype=np.float32).cache
                times.append(time.perf_counter() - start)
            row = {"length": length, "form": form, "seconds": min(times[1:]), "cache_bytes": measured,
                   "values_per_token": measured / (length * itemsize), "formula": formula["naive" if form == "naive" else "latent"]}
            if form == "absorbed" and torch_mla is not None:
                row.update(_torch_decode(config, weights, torch_mla, latent_rows, tokens, steps))
            log(f"decode L={length} {form}: {row['seconds'] * 1e3:.1f} ms/token, cache {measured / 2**20:.1f} MiB "
                f"({row['values_per_token']:.0f} values/token, formula {row['formula']})"
                + (f"; torch {row['torch_seconds'] * 1e3:.1f} ms (numpy/torch {row['seconds'] / row['torch_seconds']:.2f})" if "torch_seconds" in row else ""))
            rows.append(row)
        del caches, cache
    return rows


def _torch_decode(config, weights, torch_mla, latent_rows, tokens, steps) -> dict:
    length = latent_rows.shape[1]
    buffer = torch_mla.latent_rows(latent_rows, length + steps + 2)
    times = []
    for step in range(steps + 1):
        wait_for_quiet(max_wait=30)
        start = time.perf_counter()
        out = torch_mla.decode(tokens[step], buffer, length + step)
        times.append(time.perf_counter() - start)
    # the same first token against the same rows, through mla_ref, for the difference
    reference = mla_forward(config, weights, tokens[0], cache=LatentCache.empty(config, 1, np.float32).append(latent_rows, np.array([length])),
                            dtype=np.float32).output
    check = torch_mla.decode(tokens[0], torch_mla.latent_rows(latent_rows, length + 1), length)
    del out
    return {"torch_seconds": min(times[1:]), "torch_error": relative_error(check, reference)}


def linear_fit(rows: list[dict], form: str) -> dict | None:
    """Least-squares ``t = a + b L`` over the measured lengths; the largest relative deviation from it."""
    points = [(row["length"], row["seconds"]) for row in rows if row["form"] == form and "seconds" in row]
    if len(points) < 3:
        return None
    lengths, seconds = (np.array(values, dtype=np.float64) for values in zip(*points))
    slope, intercept = np.polyfit(lengths, seconds, 1)
    deviation = float(np.max(np.abs(intercept + slope * lengths - seconds) / seconds))
    return {"form": form, "intercept_ms": intercept * 1e3, "ms_per_1k": slope * 1e6, "max_deviation": deviation}


class PooledExperts(Mapping):
    """Layer tensors where routed expert ``e`` reads the generated tensors of pool expert ``pool_ids[e % len(pool)]``.

    At deepseek-v3 shapes one routed expert is 176 MB in float32, so the ~250 experts that 64
    or 1024 tokens reach do not fit in memory; each expert's weights stream from DRAM either
    way (far larger than the caches), so the time is that of distinct experts.
    """

    def __init__(self, base: dict, pool: dict, needed: list[int]) -> None:
        self.base, self.pool, self.pool_ids, self.needed = base, pool, sorted(pool), needed

    def __getitem__(self, name: str):
        if name in self.base:
            return self.base[name]
        match = re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+\.weight)", name)
        if match is None or int(match.group(1)) not in self.needed:
            raise KeyError(name)
        source = self.pool_ids[int(match.group(1)) % len(self.pool_ids)]
        return self.pool[source][match.group(2)]

    def __iter__(self):
        yield from self.base
        for expert in self.needed:
            yield from (f"mlp.experts.{expert}.{suffix}" for suffix in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))

    def __len__(self) -> int:
        return len(self.base) + 3 * len(self.needed)


def bench_moe(config, plan: Plan, pool_size: int = 8) -> list[dict]:
    layer = config.first_k_dense_replace  # the first MoE layer
    prefix = f"model.layers.{layer}."
    shapes = layer_weight_shapes(config, layer)
    strip = lambda tensors: {name[len(prefix):]: value for name, value in tensors.items()}  # noqa: E731
    base = strip(generate_weights(config, 0, names=moe_weight_names(config, layer, np.zeros(0, np.int64)), shapes=shapes, dtype=np.float32))
    rng = np.random.default_rng(3)
    hidden_all = rng.standard_normal((max(plan.moe_tokens), config.hidden_size), dtype=np.float32)
    first_ids = route(config, base, hidden_all[:1], dtype=np.float32).expert_ids
    pool_ids = sorted(set(np.unique(first_ids).tolist()))[:pool_size]
    pool = {expert: {name[len(prefix) + len(f"mlp.experts.{expert}."):]: value for name, value in generate_weights(
        config, 0, names=needed_expert_weight_names(config, layer, [expert]), shapes=shapes, dtype=np.float32).items()} for expert in pool_ids}
    expert_bytes = sum(value.nbytes for value in next(iter(pool.values())).values())
    rows = []
    for tokens in plan.moe_tokens:
        hidden = hidden_all[:tokens]
        needed = sorted(set(np.unique(route(config, base, hidden, dtype=np.float32).expert_ids).tolist()))
        weights = PooledExperts(base, pool, needed)
        rate, shape = matmul_rate(2048)
        seconds, _ = timed(lambda: ffn_forward(config, weights, hidden, layer, dtype=np.float32).output, plan.reps)
        busy = OTHERS[-1]
        k, inner = config.num_experts_per_tok, config.moe_intermediate_size
        flops = (2.0 * tokens * config.hidden_size * config.n_routed_experts + 6.0 * config.hidden_size * inner * tokens * k
                 + 6.0 * config.hidden_size * config.shared_expert_width * tokens)
        row = {"tokens": tokens, "experts": len(needed), "distinct": len(set(needed) & set(pool_ids)) == len(needed),
               "expert_gib": len(needed) * expert_bytes / GIB, "seconds": seconds, "others": busy, "gflop": flops / 1e9,
               "gflops": flops / seconds / 1e9, "matmul_gflops": rate, "matmul_shape": shape}
        row["fraction"] = row["gflops"] / rate
        log(f"MoE {tokens} tokens ({len(needed)} experts): {seconds:.3f} s, {row['gflops']:.1f} GFLOP/s = {row['fraction']:.0%} of {rate:.1f}")
        rows.append(row)
    return rows


def bench_peak_memory(config, weights, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        for name, value in weights.items():
            np.save(Path(folder) / f"{name}.npy", value)
        command = [sys.executable, str(Path(__file__).with_name("peak_memory.py")), folder, str(tokens)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"tokens": tokens, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["extra_bytes"] = result["prefill_peak_bytes"] - result["weights_bytes"]
    log(f"peak memory T={tokens}: {result['prefill_peak_bytes'] / GIB:.2f} GiB = weights {result['weights_bytes'] / GIB:.2f} GiB "
        f"+ {result['extra_bytes'] / GIB:.2f} GiB")
    return result


def bench_commands(run_tests: bool) -> list[dict]:
    env = dict(os.environ)
    for item in filter(None, env.pop(_REMOVED_KEY, "").split(";")):
        name, value = item.split("=", 1)
        env[name] = value  # the commands run as users run them
    mla_ref = [sys.executable, "-c", "import sys; from mla_ref.cli import main; sys.exit(main())"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        commands = [("mla-ref golden generate (into a temp dir)", mla_ref + ["golden", "generate", "--dir", folder]),
                    ("mla-ref golden verify", mla_ref + ["golden", "verify"])]
        if run_tests:
            commands.append(("default test suite (python -m pytest -q)", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]))
        for label, command in commands:
            wait_for_quiet()
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
            seconds = time.perf_counter() - start
            tail = (done.stdout.strip().splitlines() or [""])[-1]
            rows.append({"command": label, "seconds": seconds, "exit": done.returncode, "tail": tail})
            log(f"{label}: {seconds:.1f} s (exit {done.returncode}: {tail})")
    return rows


# ---------------------------------------------------------------------------- report

def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def report(info: dict, prefill: list[dict], decode: list[dict], moe: list[dict], peak: dict, commands: list[dict],
           quick: bool) -> str:
    lines = [f"# mla-ref benchmark{' (--quick)' if quick else ''}", "",
             f"- date: {info['date']}; machine: {info['machine']}",
             f"- python {info['python']}, numpy {info['numpy']}, BLAS: {info['blas']}; torch {info['torch']}",
             f"- threads: {info['threads']} for numpy's BLAS and for torch; load average (1/5/15 min) at start {info['load_start']}, "
             f"at end {info['load_end']}",
             ]
    lines.append("- every timed call starts once other processes use under a quarter of a core (or after 90 s); "
                 "\"others' CPU\" is the cores they used during the best call (BLAS threads stall when a neighbour is busy)")
    if info["removed_env"]:
        lines.append(f"- removed for this run only: {info['removed_env']} (the timed commands of the last table keep them)")
    lines += ["", "## Targets", "", "| target | measured | status |", "|---|---|---|"]
    lines += _target_rows(prefill, decode, moe, peak, commands)

    lines += ["", "## MLA prefill (deepseek-v3 attention, one layer, float32, batch 1, naive form)", "", PREFILL_FORMULA + ".", "",
              "| T | time | GFLOP | GFLOP/s | matmul GFLOP/s (same run, shape) | fraction | torch time | numpy / torch | rel. diff vs torch | others' CPU |",
              "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in prefill:
        torch_cells = (f"{_fmt_seconds(row['torch_seconds'])} | {row['torch_ratio']:.2f} | {row['torch_error']:.1e}"
                       if "torch_seconds" in row else "skipped | | ")
        lines.append(f"| {row['tokens']} | {_fmt_seconds(row['seconds'])} | {row['gflop']:.0f} | {row['gflops']:.1f} | "
                     f"{row['matmul_gflops']:.1f} ({row['matmul_shape']}) | {row['fraction']:.0%} | {torch_cells} | {row['others']:.2f} |")

    lines += ["", "## Decode per token against the cached length L (deepseek-v3, float32, batch 1)", "",
              "Time: the best of the timed steps (one untimed warm-up step; numpy and torch alike, as for every other row: "
              "a neighbour's burst only ever adds time), mla_forward with one new token; cache bytes "
              "measured from the arrays that hold the L tokens; formula: cache_values_per_token (`mla-ref info`).", "",
              "| L | form | time per token | cache bytes | values / token / layer | formula | torch (absorbed) | numpy / torch |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in decode:
        if "skipped" in row:
            lines.append(f"| {row['length']} | {row['form']} | skipped: {row['skipped']} | | | | | |")
            continue
        torch_cells = (f"{_fmt_seconds(row['torch_seconds'])} | {row['seconds'] / row['torch_seconds']:.2f}" if "torch_seconds" in row else " | ")
        lines.append(f"| {row['length']} | {row['form']} | {_fmt_seconds(row['seconds'])} | {row['cache_bytes'] / 2**20:.1f} MiB | "
                     f"{row['values_per_token']:.0f} | {row['formula']} | {torch_cells} |")
    fits = [fit for fit in (linear_fit(decode, form) for form in ("naive", "absorbed", "paged-absorbed")) if fit]
    if fits:
        lines += ["", "Linear fit t = a + b·L: " + "; ".join(
            f"{fit['form']}: a = {fit['intercept_ms']:.1f} ms, b = {fit['ms_per_1k']:.2f} ms per 1k keys, largest deviation {fit['max_deviation']:.0%}"
            for fit in fits) + "."]

    lines += ["", "## MoE layer (deepseek-v3, first MoE layer, float32)", "", MOE_FORMULA + ".", "",
              "| tokens | experts used | time | GFLOP | GFLOP/s | matmul GFLOP/s (same run, shape) | fraction | others' CPU |",
              "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in moe:
        lines.append(f"| {row['tokens']} | {row['experts']} ({row['expert_gib']:.1f} GiB) | {_fmt_seconds(row['seconds'])} | "
                     f"{row['gflop']:.1f} | {row['gflops']:.1f} | {row['matmul_gflops']:.1f} ({row['matmul_shape']}) | {row['fraction']:.0%} | {row['others']:.2f} |")
    lines += ["", "Experts: the gate, bias and shared expert are generated; routed experts are served from a pool of "
              "8 generated experts (expert e reads pool[e mod 8]) because the ~250 experts that 64 or 1024 tokens reach "
              "would need ~44 GiB in float32; every expert's 168 MiB still streams from memory, as distinct experts would."]

    lines += ["", "## Peak resident memory of one prefill (fresh process, default chunking)", ""]
    if "error" in peak:
        lines.append(f"T = {peak['tokens']}: failed: {peak['error']}")
    else:
        lines += ["| T | weights | resident before | peak during prefill | peak - weights | prefill time |", "|---:|---:|---:|---:|---:|---:|",
                  f"| {peak['tokens']} | {peak['weights_bytes'] / GIB:.2f} GiB | {peak['rss_before_bytes'] / GIB:.2f} GiB | "
                  f"{peak['prefill_peak_bytes'] / GIB:.2f} GiB | {peak['extra_bytes'] / GIB:.2f} GiB | {_fmt_seconds(peak['seconds'])} |",
                  "", f"Resident before = weights + hidden input ({peak['hidden_bytes'] / GIB:.2f} GiB) + interpreter; the peak is "
                  "the high-water mark reset after loading the weights."]

    lines += ["", "## Wall time", "", "| command | time | exit | last line |", "|---|---:|---:|---|"]
    for row in commands:
        lines.append(f"| {row['command']} | {row['seconds']:.1f} s | {row['exit']} | {row['tail']} |")
    return "\n".join(lines) + "\n"


def _target_rows(prefill, decode, moe, peak, commands) -> list[str]:
    rows = []
    for row in prefill:
        if row["tokens"] in (2048, 8192):
            rows.append(f"| prefill T = {row['tokens']}: >= 70% of the float32 matmul rate | {row['fraction']:.0%} "
                        f"({row['gflops']:.1f} / {row['matmul_gflops']:.1f} GFLOP/s) | {_status(row['fraction'] >= TARGETS['prefill_fraction'])} |")
    for row in prefill:
        if "torch_ratio" in row:
            rows.append(f"| prefill T = {row['tokens']}: numpy <= 1.2x torch | {row['torch_ratio']:.2f}x | {_status(row['torch_ratio'] <= TARGETS['torch_ratio'])} |")
    for row in decode:
        if "torch_seconds" in row:
            ratio = row["seconds"] / row["torch_seconds"]
            rows.append(f"| decode L = {row['length']}: numpy <= 1.2x torch (absorbed) | {ratio:.2f}x | {_status(ratio <= TARGETS['torch_ratio'])} |")
    by_length = {}
    for row in decode:
        if "seconds" in row:
            by_length.setdefault(row["length"], {})[row["form"]] = row["seconds"]
    for length, forms in sorted(by_length.items()):
        if length >= 4096 and "naive" in forms and "absorbed" in forms:
            rows.append(f"| decode L = {length}: absorbed faster than naive | {forms['absorbed'] * 1e3:.1f} vs {forms['naive'] * 1e3:.1f} ms | "
                        f"{_status(forms['absorbed'] < forms['naive'])} |")
    latent = [row for row in decode if row["form"] in ("absorbed", "paged-absorbed") and "values_per_token" in row]
    if latent:
        exact = all(row["values_per_token"] == row["formula"] for row in latent)
        rows.append(f"| latent cache bytes = the formula (576 values / token / layer) | "
                    f"{sorted({round(row['values_per_token'], 3) for row in latent})} | {_status(exact)} |")
    for fit in (linear_fit(decode, form) for form in ("absorbed", "paged-absorbed", "naive")):
        if fit:
            rows.append(f"| decode time linear in L ({fit['form']}) | largest deviation from the fit {fit['max_deviation']:.0%} | "
                        f"{_status(fit['max_deviation'] <= 0.2)} |")
    for row in moe:
        if row["tokens"] == 1024:
            rows.append(f"| MoE 1024 tokens: >= 50% of the matmul rate | {row['fraction']:.0%} | {_status(row['fraction'] >= TARGETS['moe_fraction'])} |")
    if "extra_bytes" in peak:
        ok = peak["extra_bytes"] <= TARGETS["peak_extra_bytes"] if peak["tokens"] == 8192 else None
        rows.append(f"| prefill T = {peak['tokens']}: peak <= weights + 3 GiB | weights + {peak['extra_bytes'] / GIB:.2f} GiB | {_status(ok)} |")
    for row in commands:
        if row["command"].startswith("default test suite"):
            rows.append(f"| default test suite < 60 s | {row['seconds']:.1f} s | {_status(row['seconds'] < TARGETS['tests_seconds'])} |")
        if row["command"] == "mla-ref golden verify":
            rows.append(f"| mla-ref golden verify < 60 s | {row['seconds']:.1f} s | {_status(row['seconds'] < TARGETS['verify_seconds'])} |")
    return rows


def plot(decode: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: plot skipped (pip install matplotlib)"
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for form, marker in (("naive", "o"), ("absorbed", "s"), ("paged-absorbed", "^")):
        points = [row for row in decode if row["form"] == form and "seconds" in row]
        if points:
            left.plot([p["length"] for p in points], [p["seconds"] * 1e3 for p in points], marker=marker, label=form)
            right.plot([p["length"] for p in points], [p["cache_bytes"] / 2**20 for p in points], marker=marker, label=form)
    for axis, label in ((left, "time per decode token (ms)"), (right, "cache bytes per layer (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("cached length L")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle("MLA decode at deepseek-v3 shapes, float32, one layer")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"plot: {_shown(path)}"


COMMITTED_RESULTS = Path(__file__).resolve().with_name("results.md")


def _shown(path: Path) -> Path:
    """``path`` relative to the checkout when inside it (as the committed results name it), else absolute."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def plot_path(out: Path) -> Path:
    """The plot beside the results: decode_vs_length.png for the committed results, <stem>_decode_vs_length.png otherwise."""
    if out.resolve() == COMMITTED_RESULTS:
        return COMMITTED_RESULTS.with_name("decode_vs_length.png")
    return out.with_name(f"{out.stem}_decode_vs_length.png")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes (smoke test)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="BLAS and torch threads (default: the usable cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.local.md"),
                        help="Markdown file to write, anywhere (default benchmarks/results.local.md; "
                             "benchmarks/results.md, the committed results, only when named)")
    parser.add_argument("--keep-openblas-env", action="store_true", help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE if set")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the run
    plan = QUICK if args.quick else FULL
    from threadpoolctl import threadpool_limits
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    sys.path.insert(0, str(Path(__file__).parent))
    info = environment(args.threads)
    log(f"{info['machine']}; {info['blas']}; torch {info['torch']}; load {info['load_start']}")
    config = load_config("deepseek-v3")
    with threadpool_limits(args.threads, user_api="blas"):
        start = time.perf_counter()
        weights = generate_attention_weights(config, seed=0, dtype=np.float32)
        log(f"attention weights: {sum(v.nbytes for v in weights.values()) / GIB:.2f} GiB in {time.perf_counter() - start:.1f} s")
        torch_mla = _torch_mla(config, weights) if torch is not None else None
        prefill = bench_prefill(config, weights, plan, torch_mla)
        decode = bench_decode(config, weights, plan, torch_mla)
        torch_mla = None
        moe = bench_moe(config, plan)
        peak = bench_peak_memory(config, weights, plan.peak_tokens)
        del weights
        commands = bench_commands(plan.run_tests)
    info["load_end"] = load_average()
    text = report(info, prefill, decode, moe, peak, commands, args.quick)
    note = plot(decode, plot_path(args.out))
    text += f"\n{note}\n"
    args.out.write_text(text)
    print()
    print(text)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
