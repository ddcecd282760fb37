"""Input checks shared by every section: dtypes, shapes, integer vectors, finiteness."""

from __future__ import annotations

import weakref

import numpy as np

from .errors import InputError, ShapeError, WeightError

# (id of a weight array, dtype) -> (weak reference to it, its cast, or None where the cast is the array itself)
_CHECKED_WEIGHTS: dict[tuple[int, str], tuple[weakref.ref, np.ndarray | None]] = {}


def compute_dtype(dtype, spec_id: str = "MLA.1") -> np.dtype:
    """The compute dtype: float64 (default, the ground truth) or float32."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise InputError("dtype", f"expected float64 or float32, got {dtype}", spec_id)
    return dtype


def all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite. NaN and inf survive a sum, so a finite sum proves it
    without a temporary the size of ``array`` (weights are checked on every call); an
    overflowing sum falls back to the elementwise test."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(array)):
            return True
    return bool(np.isfinite(array).all())


def first_nonfinite(array: np.ndarray) -> tuple[int, ...]:
    """Index of the first NaN / inf of ``array`` (which has one)."""
    return tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])


def checked_weight(name: str, value: np.ndarray, dtype, spec_id: str) -> np.ndarray:
    """A float weight cast to ``dtype`` and checked finite, remembered while the array lives.

    Weights are read on every call (each decode step) and do not change in place, so the
    cast and the finiteness check are done once per array; a changed tensor is a new array.
    """
    dtype = np.dtype(dtype)
    key = (id(value), dtype.str)
    entry = _CHECKED_WEIGHTS.get(key)
    if entry is not None and entry[0]() is value:
        return value if entry[1] is None else entry[1]
    cast = value.astype(dtype, copy=False)
    if not all_finite(cast):
        index = first_nonfinite(cast)
        raise WeightError(name, f"contains {cast[index]} at index {index}; expected finite values", spec_id)
    try:
        reference = weakref.ref(value, lambda _, key=key: _CHECKED_WEIGHTS.pop(key, None))
    except TypeError:  # not weak-referenceable: checked every call
        return cast
    _CHECKED_WEIGHTS[key] = (reference, None if cast is value else cast)
    return cast


def check_tensor(name: str, value, shape: tuple, spec_id: str, dtype, allow_nonfinite: bool = False) -> np.ndarray:
    """Check rank, fixed dims (ints) and finiteness of a float input; return it cast to ``dtype``.

    ``shape`` mixes symbol names (any size) and ints (required size).
    """
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise ShapeError(name, f"expected a real float array, got dtype {array.dtype}", spec_id)
    written = "[" + ", ".join(str(dim) for dim in shape) + "]"
    if array.ndim != len(shape) or any(isinstance(dim, int) and dim != size for dim, size in zip(shape, array.shape)):
        raise ShapeError(name, f"expected {written}, got {tuple(array.shape)}", spec_id)
    array = array.astype(dtype, copy=False)
    if not allow_nonfinite and not all_finite(array):
        index = first_nonfinite(array)
        raise InputError(name, f"contains {array[index]} at index {index}; pass allow_nonfinite=True to accept NaN/Inf", spec_id)
    return array


def check_int_vector(name: str, value, batch: int, spec_id: str) -> np.ndarray:
    """An integer vector of shape ``[batch]`` with values >= 0."""
    array = np.asarray(value)
    if array.ndim == 0 and array.dtype.kind in "iu":
        array = np.full(batch, int(array))
    if array.shape != (batch,) or array.dtype.kind not in "iu":
        raise ShapeError(name, f"expected integers of shape [{batch}], got {array.dtype} {list(array.shape)}", spec_id)
    if (array < 0).any():
        raise InputError(name, f"expected values >= 0, got {array.tolist()}", spec_id)
    return array.astype(np.int64)
