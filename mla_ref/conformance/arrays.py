"""Adapter outputs as NumPy arrays, whatever array type the adapter returns (spec/golden.yaml checker.outputs).

torch tensors (CPU or CUDA, any dtype: bfloat16 and float8 go through float32), JAX and
other ``__array__`` objects, objects with ``.numpy()`` / ``.cpu()``, nested lists and
scalars. What cannot become a numeric array (a ragged list, an object array) is a
``ValueError`` saying why, which fails that case only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..spec import load_spec_file

FLOAT8_UNIT_ROUNDOFF = {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
DTYPE_FORMATS = {"float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                 "bfloat16": "bf16"}


def as_array(value: Any) -> tuple[np.ndarray, str]:
    """``value`` as a numeric NumPy array, and the name of the dtype it came in (``torch.bfloat16``, ``float16``)."""
    source = str(getattr(value, "dtype", "")) or type(value).__name__
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, on any device
        array = _torch_to_numpy(value.detach().cpu())
    elif hasattr(value, "__array__"):  # JAX, xarray, array-likes
        array = np.asarray(value)
    elif hasattr(value, "numpy") or hasattr(value, "cpu"):
        moved = value.cpu() if hasattr(value, "cpu") else value
        array = np.asarray(moved.numpy() if hasattr(moved, "numpy") else moved)
    else:
        array = _from_sequence(value)
    if array.dtype.kind == "V":  # ml_dtypes bfloat16 / float8 (JAX): no NumPy arithmetic, widen
        array = array.astype(np.float32)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"not a numeric array: dtype {array.dtype} (from {type(value).__name__})")
    return array, source


def _torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as NumPy; dtypes NumPy lacks (bfloat16, float8) through float32, exactly."""
    try:
        return tensor.numpy()
    except TypeError:  # "Got unsupported ScalarType BFloat16"
        return tensor.float().numpy()


def _from_sequence(value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as error:  # inhomogeneous nested lists
        raise ValueError(f"a ragged nested {type(value).__name__} (rows of different lengths) is no array: {error}") from None
    if array.dtype == object:
        raise ValueError(f"a nested {type(value).__name__} of {_element_types(value)} is no numeric array")
    return array


def _element_types(value: Any) -> str:
    kinds = sorted({type(item).__name__ for item in value}) if isinstance(value, (list, tuple)) else [type(value).__name__]
    return ", ".join(kinds)


def dtype_unit_roundoff(name: str) -> float | None:
    """The unit roundoff of a floating dtype by name (``torch.bfloat16``, ``float16``, ``float8_e4m3fn``); None if not a float."""
    bare = name.rsplit(".", 1)[-1]
    if bare.startswith("float8"):
        return next((u for kind, u in FLOAT8_UNIT_ROUNDOFF.items() if kind in bare), None)
    fmt = DTYPE_FORMATS.get(bare)
    return None if fmt is None else float(load_spec_file("tolerance.yaml")["formats"][fmt])
