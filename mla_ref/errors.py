"""The one exception hierarchy of mla-ref.

Every error names the field or tensor, what was expected, what came, and the spec id
of the rule it breaks, e.g.
``ShapeError("hidden: expected [batch, seq, 7168], got (2, 5, 7169) (MLA.1)")``.
All of them derive from ``ValueError`` so generic callers can still catch them.
"""

from __future__ import annotations


MAX_WHAT_CHARS = 200  # a message never echoes an unbounded value (a huge key, an alias-bomb field)
MAX_PROBLEM_CHARS = 2000


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing user input into a message.

    Containers are written piece by piece and stop at the limit, so a value whose full repr
    is astronomically long (a YAML alias bomb: nine references to nine references...) costs
    no more than ``limit`` characters.
    """
    pieces: list[str] = []
    budget = [limit + 1]

    def emit(text: str) -> None:
        pieces.append(text[: budget[0]])
        budget[0] -= len(pieces[-1])

    def walk(item) -> None:
        if budget[0] <= 0:
            return
        if isinstance(item, dict):
            emit("{")
            for index, (key, member) in enumerate(item.items()):
                if budget[0] <= 0:
                    return
                emit(", " if index else "")
                walk(key)
                emit(": ")
                walk(member)
            emit("}")
        elif isinstance(item, (list, tuple)):
            emit("[" if isinstance(item, list) else "(")
            for index, member in enumerate(item):
                if budget[0] <= 0:
                    return
                emit(", " if index else "")
                walk(member)
            emit("]" if isinstance(item, list) else ")")
        else:
            text = repr(item) if not isinstance(item, str) or len(item) <= limit else repr(item[: limit + 1])
            emit(text)

    walk(value)
    text = "".join(pieces)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (ending in ... when cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MlaRefError(ValueError):
    """Base class: ``what`` is the field or tensor, ``spec_id`` the rule broken."""

    def __init__(self, what: str, problem: str, spec_id: str):
        self.what = clip_text(str(what), MAX_WHAT_CHARS)
        self.problem = clip_text(str(problem), MAX_PROBLEM_CHARS)
        self.spec_id = spec_id
        super().__init__(f"{self.what}: {self.problem} ({spec_id})")


class SpecError(MlaRefError):
    """The YAML spec itself is malformed (file, key, problem)."""


class ConfigError(MlaRefError):
    """A configuration field is missing, of the wrong type or breaks a constraint."""


class WeightError(MlaRefError):
    """A weight is missing, unexpected, or has the wrong shape or dtype."""


class ShapeError(MlaRefError):
    """An input tensor has the wrong rank, shape or dtype."""


class InputError(MlaRefError):
    """An input value is invalid: a position out of range, NaN or Inf, a bad option."""


class CacheError(MlaRefError):
    """A cache does not fit the config, is full, or its block table is invalid."""


class GoldenError(MlaRefError):
    """A golden file or manifest is missing, tampered with, malformed or unsafe."""


class NumericError(MlaRefError):
    """A step would return NaN or inf from finite inputs (overflow, 0/0): the step is named, nothing is returned."""


class ResourceError(MlaRefError):
    """An allocation driven by a config or a file header would exceed the memory limit (mla_ref.checks.memory_limit)."""


class ConfigWarning(UserWarning):
    """A Hugging Face / official config has keys mla-ref does not read (an error with strict=True) or does not model."""


class Unsupported(MlaRefError):
    """An adapter's declaration that a case lies outside its implementation (a config it cannot express, an entry point it lacks).

    Raised by an adapter, not by mla-ref: the checker reports the case as ``unsupported`` with ``reason``,
    never as a pass (spec/golden.yaml adapter.unsupported, GOLDEN.adapter.unsupported).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__("adapter", reason, "GOLDEN.adapter.unsupported")
