"""Load and check the YAML spec (``spec/``), and evaluate its symbolic shapes.

YAML is read with the safe loader only (``yaml.CSafeLoader`` where libyaml is present, else ``yaml.SafeLoader``: the same safe subset). A malformed file is reported with the file
and the key; a shape such as ``[batch, seq, num_attention_heads, qk_nope_head_dim]`` or
``[num_attention_heads * qk_head_dim, q_lora_rank]`` is evaluated by a tiny arithmetic
interpreter (names, integers, ``+ - * //`` and parentheses), never by ``eval``.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import SpecError


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def spec_dir() -> Path:
    """The spec folder: inside the installed package, else next to it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "spec", here.parent / "spec"):
        if (candidate / "spec.yaml").is_file():
            return candidate
    raise SpecError("spec/", f"spec.yaml not found in {here / 'spec'} or {here.parent / 'spec'}", "SPEC")


MAX_YAML_NODES = 5_000_000  # nodes after alias expansion; golden/manifest.yaml has ~60 000
MAX_YAML_BYTES = 256 * 2**20


def read_yaml(path: Path) -> Any:
    """Parse one YAML file with the safe loader; errors name the file (and line). See :func:`parse_yaml`."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_YAML_BYTES:
            raise SpecError(str(path), f"{size} bytes; a YAML file here is at most {MAX_YAML_BYTES}", "SPEC")
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise SpecError(str(path), f"cannot be read: {exc.strerror or exc}", "SPEC") from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), f"not UTF-8 text (byte {exc.start})", "SPEC") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """``safe_load`` of ``text``, refusing documents whose aliases expand to more than MAX_YAML_NODES nodes.

    Aliases are shared, not copied, by the loader; a reader that walks the result (a message,
    a dump, a comparison) expands them: nine levels of nine aliases are 387 million nodes.
    The expanded count is computed on the composed node graph (each node once) before
    constructing Python objects.
    """
    loader = SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            expanded = _expanded_nodes(node)
            if expanded > MAX_YAML_NODES:
                raise SpecError(where, f"aliases expand to more than {MAX_YAML_NODES} nodes (an alias bomb?)", "SPEC")
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(where, f"malformed YAML{at}: {problem}", "SPEC") from None
    except RecursionError:
        raise SpecError(where, "nested too deeply", "SPEC") from None
    finally:
        loader.dispose()


def _expanded_nodes(root) -> int:
    """Nodes of the document with every alias expanded, computed once per distinct node."""
    counts: dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # post-order without recursion
        node = stack.pop()
        if id(node) in counts:
            continue
        counts[id(node)] = -1
        order.append(node)
        stack.extend(_children(node))
    for node in reversed(order):
        counts[id(node)] = min(1 + sum(counts[id(child)] for child in _children(node)), MAX_YAML_NODES + 1)
    return counts[id(root)]


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def require_keys(mapping: Any, keys: tuple[str, ...], where: str) -> None:
    """Raise ``SpecError`` naming ``where`` and the first missing key."""
    if not isinstance(mapping, dict):
        raise SpecError(where, f"expected a mapping, got {type(mapping).__name__}", "SPEC")
    for key in keys:
        if key not in mapping:
            raise SpecError(f"{where}.{key}", "required key is missing", "SPEC")


@functools.lru_cache(maxsize=None)
def load_spec_file(name: str) -> dict:
    """Load ``spec/<name>`` and check that it carries the index's ``spec_version``."""
    folder = spec_dir()
    data = read_yaml(folder / name)
    require_keys(data, ("spec_version",), name)
    if name != "spec.yaml":
        version = spec_version()
        if data["spec_version"] != version:
            raise SpecError(f"{name}.spec_version",
                            f"expected {version!r} (spec.yaml), got {data['spec_version']!r}", "SPEC")
    return data


def spec_version() -> str:
    """The version of the whole spec, from ``spec/spec.yaml``."""
    return str(load_spec_file("spec.yaml")["spec_version"])


STEP_KEYS = ("id", "name", "inputs", "outputs", "equation", "paper", "function", "pitfalls")


def load_steps(name: str) -> list[dict]:
    """The ordered steps of a section file (``mla.yaml``...), each checked for its keys."""
    data = load_spec_file(name)
    require_keys(data, ("steps",), name)
    steps = data["steps"]
    if not isinstance(steps, list):
        raise SpecError(f"{name}.steps", "expected a list of steps", "SPEC")
    seen = set()
    for index, step in enumerate(steps):
        require_keys(step, STEP_KEYS, f"{name}.steps[{index}]")
        if step["id"] in seen:
            raise SpecError(f"{name}.steps[{index}].id", f"duplicate id {step['id']!r}", "SPEC")
        seen.add(step["id"])
        for side in ("inputs", "outputs"):
            if not isinstance(step[side], dict):
                raise SpecError(f"{name}.{step['id']}.{side}", "expected a mapping name -> shape", "SPEC")
    return steps


def step_by_id(step_id: str) -> dict:
    """Find one step (``MLA.7``) in the section file its prefix names."""
    section = step_id.split(".")[0].lower()
    for step in load_steps(f"{section}.yaml"):
        if step["id"] == step_id:
            return step
    raise SpecError(step_id, f"no such step in spec/{section}.yaml", "SPEC")


def resolve_function(dotted: str):
    """The object a spec's ``function:`` names (``mla_ref.mla.absorb_query``, ``mla_ref.config.ModelConfig.qk_head_dim``)."""
    import importlib
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            raise SpecError(dotted, f"{attribute!r} does not exist", "SPEC") from None
        return obj
    raise SpecError(dotted, "no importable module in this name", "SPEC")


_ALLOWED_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                   ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b}


def evaluate_dim(expression: str | int, symbols: Mapping[str, int]) -> int:
    """Evaluate one symbolic dimension (``num_attention_heads * qk_head_dim``) to an int."""
    if isinstance(expression, int):
        return expression
    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError:
        raise SpecError(str(expression), "not a valid dimension expression", "SPEC") from None

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols or symbols[node.id] is None:
                raise SpecError(str(expression), f"unknown or unset symbol {node.id!r}", "SPEC")
            return int(symbols[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_BINOPS:
            return _ALLOWED_BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise SpecError(str(expression), f"unsupported syntax {ast.dump(node)}", "SPEC")

    return walk(tree)


_SHAPE_RE = re.compile(r"^\[(.*)\]$")


def parse_shape(shape: str) -> list[str]:
    """Split ``"[batch, seq, kv_lora_rank + qk_rope_head_dim]"`` into its dimension strings."""
    match = _SHAPE_RE.match(str(shape).strip())
    if not match:
        raise SpecError(str(shape), "a shape must be written [dim, dim, ...]", "SPEC")
    body = match.group(1).strip()
    return [part.strip() for part in body.split(",")] if body else []


def evaluate_shape(shape: str, symbols: Mapping[str, int]) -> tuple[int, ...]:
    """Evaluate a symbolic shape to a tuple of ints."""
    return tuple(evaluate_dim(dim, symbols) for dim in parse_shape(shape))
