"""Apply a mutant of tests/mutants/catalogue.yaml to the torch adapter's source text and load it as its own module.

The adapter file on disk is never touched: the patched text is compiled under the module
name ``torch_adapter_mutant_<name>``.
"""

from __future__ import annotations

import contextlib
import functools
import types
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "examples" / "torch_adapter.py"
CATALOGUE = Path(__file__).with_name("catalogue.yaml")


@functools.lru_cache(maxsize=None)
def catalogue() -> tuple[dict, ...]:
    """Every mutant: ``{name, bug, steps, find, replace, fp32_only?, profile?, scale_fmt?, golden_gap?, reaches?}``; ``profile: fp8``
    marks a bug of the FP8 code path, judged under the fp8 profile only (in the adapter's fp8 mode); ``reaches`` limits a
    mutant to the cases whose id starts with it."""
    return tuple(yaml.safe_load(CATALOGUE.read_text())["mutants"])


def mutant(name: str) -> dict:
    return next(entry for entry in catalogue() if entry["name"] == name)


@functools.lru_cache(maxsize=None)
def correct_variants() -> tuple[dict, ...]:
    """One-line changes that keep the adapter correct: ``{name, why, find, replace}``; the checker must accept them."""
    return tuple(yaml.safe_load(CATALOGUE.read_text())["correct_variants"])


def matching_lines(source: str, find: str) -> list[int]:
    """Indices of the lines whose text, indentation stripped, is ``find``."""
    return [index for index, line in enumerate(source.splitlines()) if line.strip() == find.strip()]


def patched_source(entry: dict, source: str | None = None) -> str:
    """The adapter source with the mutant's one line replaced (indentation kept); the line must occur exactly once."""
    source = ADAPTER.read_text() if source is None else source
    hits = matching_lines(source, entry["find"])
    if len(hits) != 1:
        raise ValueError(f"mutant {entry['name']}: `find` matches {len(hits)} lines of {ADAPTER.name}, expected exactly 1")
    lines = source.splitlines(keepends=True)
    line = lines[hits[0]]
    indent = line[: len(line) - len(line.lstrip())]
    lines[hits[0]] = indent + entry["replace"].strip() + "\n"
    return "".join(lines)


def load(entry: dict | None, dtype: str = "float64", device: str = "cpu") -> types.ModuleType:
    """The adapter (``entry=None``) or one of its mutants as a fresh module, configured for ``dtype``."""
    name = "torch_adapter_original" if entry is None else f"torch_adapter_mutant_{entry['name']}"
    source = ADAPTER.read_text() if entry is None else patched_source(entry)
    module = types.ModuleType(name)
    module.__file__ = str(ADAPTER)
    exec(compile(source, f"{ADAPTER} [{name}]", "exec"), module.__dict__)  # noqa: S102 - our own adapter text
    module.configure(dtype, device)
    if entry is not None and "scale_fmt" in entry:  # a mutant of the ue8m0 activation scales runs with them
        module.SCALE_FMT = entry["scale_fmt"]
    return module


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread while the zoo runs (tiny tensors: thread start-up costs more than it saves), restored afterwards."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
