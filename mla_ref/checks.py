"""Input checks shared by every section: dtypes, shapes, integer vectors, finiteness."""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError


def compute_dtype(dtype, spec_id: str = "MLA.1") -> np.dtype:
    """The compute dtype: float64 (default, the ground truth) or float32."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise InputError("dtype", f"expected float64 or float32, got {dtype}", spec_id)
    return dtype


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
    if not allow_nonfinite and not np.isfinite(array).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
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
