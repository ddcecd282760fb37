"""The conformance checker: adapters, precision profiles, comparison and reports (spec/golden.yaml, spec/tolerance.yaml).

Run it as ``mla-ref check ADAPTER``, as ``pytest --pyargs mla_ref.conformance`` with
``MLA_REF_ADAPTER`` set, or from Python with :func:`mla_ref.conformance.check.check`; judge
outputs computed on your own config, weights and inputs with :func:`check_outputs`
(``mla-ref check-outputs``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_outputs"]


def __getattr__(name: str) -> Any:
    """``check_outputs`` imported on first use: the golden cases import this package's reference adapter."""
    if name == "check_outputs":
        from .own_inputs import check_outputs
        return check_outputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
