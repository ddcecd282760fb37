"""The one exception hierarchy of mla-ref.

Every error names the field or tensor, what was expected, what came, and the spec id
of the rule it breaks, e.g.
``ShapeError("hidden: expected [batch, seq, 7168], got (2, 5, 7169) (MLA.1)")``.
All of them derive from ``ValueError`` so generic callers can still catch them.
"""

from __future__ import annotations


class MlaRefError(ValueError):
    """Base class: ``what`` is the field or tensor, ``spec_id`` the rule broken."""

    def __init__(self, what: str, problem: str, spec_id: str):
        self.what = what
        self.problem = problem
        self.spec_id = spec_id
        super().__init__(f"{what}: {problem} ({spec_id})")


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


class Unsupported(MlaRefError):
    """An adapter's declaration that a case lies outside its implementation (a config it cannot express, an entry point it lacks).

    Raised by an adapter, not by mla-ref: the checker reports the case as ``unsupported`` with ``reason``,
    never as a pass (spec/golden.yaml adapter.unsupported, GOLDEN.adapter.unsupported).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__("adapter", reason, "GOLDEN.adapter.unsupported")
