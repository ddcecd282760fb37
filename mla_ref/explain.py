"""``mla-ref explain STEP_ID``: a spec step, its shapes for a preset, and the code that computes it."""

from __future__ import annotations

import difflib
import inspect

from .config import ModelConfig
from .errors import SpecError
from .spec import evaluate_dim, load_spec_file, parse_shape, resolve_function, spec_dir

RUNTIME_EXAMPLE = {"batch": 2, "seq": 16, "keys": 4096, "expanded": 4096, "tokens": 32, "num_blocks": 128, "block_size": 64, "max_blocks": 64,
                   "ranks": 8, "width": 576, "depth": 1, "selected": 2048}


def all_steps() -> dict[str, dict]:
    """Every step of every section file, by id."""
    steps = {}
    for path in sorted(spec_dir().glob("*.yaml")):
        data = load_spec_file(path.name)
        for step in data.get("steps", []):
            steps[step["id"]] = dict(step, file=path.name)
    return steps



def _shape_text(shape: str, symbols: dict) -> str:
    """``[batch, seq, num_attention_heads, qk_nope_head_dim]`` -> ``[2, 16, 128, 128]`` where every symbol is known."""
    sizes = []
    for dim in parse_shape(shape):
        try:
            sizes.append(str(evaluate_dim(dim, symbols)))
        except SpecError:
            sizes.append(dim)
    return "[" + ", ".join(sizes) + "]"


def explain(step_id: str, config: ModelConfig) -> str:
    """The text ``mla-ref explain`` prints."""
    steps = all_steps()
    if step_id not in steps:
        nearest = difflib.get_close_matches(step_id, list(steps), n=5, cutoff=0.3)
        raise SpecError(step_id, f"unknown step id; nearest: {nearest or sorted(steps)[:8]}", "SPEC")
    step = steps[step_id]
    symbols = {**RUNTIME_EXAMPLE, **config.symbols()}
    lines = [f"{step_id} {step['name']}  (spec/{step['file']})", "", "equation:", f"  {' '.join(str(step['equation']).split())}",
             f"paper: {step['paper']}", "", f"shapes for {config.name} (batch 2, seq 16, keys 4096, tokens 32, selected 2048):"]
    for side in ("inputs", "outputs"):
        for name, shape in step[side].items():
            lines.append(f"  {side[:-1]:6s} {name:18s} {shape}  =  {_shape_text(shape, symbols)}")
    function = resolve_function(step["function"])
    target = inspect.unwrap(function.fget if isinstance(function, property) else function)
    try:
        source_file = inspect.getsourcefile(target)
        line = inspect.getsourcelines(target)[1]
        location = f"{source_file}:{line}"
    except (TypeError, OSError):
        location = "(built in)"
    try:
        signature = str(inspect.signature(target))
    except (TypeError, ValueError):
        signature = "(...)"
    lines += ["", f"implemented by: {step['function']}{signature}", f"  at {location}"]
    doc = inspect.getdoc(target)
    if doc:
        lines.append(f"  {doc.splitlines()[0]}")
    lines += ["", "pitfalls:"] + [f"  - {pitfall}" for pitfall in step["pitfalls"] or []]
    return "\n".join(lines)
