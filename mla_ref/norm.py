"""NORM — RMSNorm (spec/norm.yaml)."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """NORM.1 — ``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)  # [..., 1]
    return x / np.sqrt(mean_square + eps) * weight
