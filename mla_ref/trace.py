"""Recording of intermediates: every spec step's outputs, by step id.

Pass a :class:`Trace` to a forward function to record what each step produced; tests
check every recorded array against the step's declared symbolic shape, and golden cases
store them. Recording turns query chunking off so each step is recorded once, whole.
"""

from __future__ import annotations

import numpy as np


class Trace:
    """``trace[step_id][name]`` is the array that step ``step_id`` produced under ``name``."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, np.ndarray]] = {}

    def record(self, step_id: str, **arrays: np.ndarray) -> None:
        """Store the named outputs of one step (a later call for the same step adds names)."""
        self.steps.setdefault(step_id, {}).update({name: np.asarray(value) for name, value in arrays.items()})

    def __getitem__(self, step_id: str) -> dict[str, np.ndarray]:
        return self.steps[step_id]

    def __contains__(self, step_id: str) -> bool:
        return step_id in self.steps


def record(trace: Trace | None, step_id: str, **arrays: np.ndarray) -> None:
    """Record into ``trace`` if one is given (the forward functions call this after each step)."""
    if trace is not None:
        trace.record(step_id, **arrays)
