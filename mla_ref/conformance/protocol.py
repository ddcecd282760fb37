"""The adapter protocol of spec/golden.yaml: entry points, their parameters and outputs."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..spec import load_spec_file


def entry_points() -> dict[str, dict]:
    """Every entry point of the protocol, by name."""
    return load_spec_file("golden.yaml")["adapter"]["entry_points"]


def parameters(entry_point: str) -> list[str]:
    """The positional parameters of an entry point, from its signature."""
    signature = entry_points()[entry_point]["signature"]
    return [name.strip() for name in signature.split("(", 1)[1].split(")", 1)[0].split(",")]


def call(function: Callable, entry_point: str, available: Mapping[str, Any], **extra: Any):
    """Call ``function`` with the protocol's arguments in signature order (``extra``: keywords of the reference only)."""
    return function(*(available[name] for name in parameters(entry_point)), **extra)
