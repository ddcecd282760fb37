"""Input checks shared by every section: dtypes, shapes, integer vectors, finiteness."""

from __future__ import annotations

import math
import os
import weakref

import numpy as np

from .errors import InputError, NumericError, ResourceError, ShapeError, WeightError

# (id of a read-only weight array, dtype) -> (weak reference to it, its cast, or None where the cast is the array itself)
_CHECKED_WEIGHTS: dict[tuple[int, str], tuple[weakref.ref, np.ndarray | None]] = {}


MEMORY_LIMIT_ENV = "MLA_REF_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_memory_limit: int | None = None


def set_memory_limit(nbytes: int | None) -> None:
    """Set the largest single allocation mla-ref makes from a config or a file header (None: the default)."""
    global _memory_limit
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1):
        raise InputError("memory limit", f"expected an int >= 1 (bytes) or None, got {nbytes!r}", "CHECKS.memory")
    _memory_limit = nbytes


def memory_limit() -> int:
    """Bytes one config- or header-driven allocation may take: :func:`set_memory_limit`, else ``$MLA_REF_MEMORY_LIMIT``
    (bytes, or with a K/M/G/T suffix), else half of the memory available now."""
    if _memory_limit is not None:
        return _memory_limit
    configured = os.environ.get(MEMORY_LIMIT_ENV, "").strip().upper().removesuffix("B")
    if configured:
        number, unit = (configured[:-1], configured[-1]) if configured[-1] in "KMGT" else (configured, "")
        try:
            return max(1, int(float(number) * _UNITS[unit]))
        except ValueError:
            raise InputError(MEMORY_LIMIT_ENV, f"expected bytes such as 8G or 500000000, got {configured[:40]!r}", "CHECKS.memory") from None
    return _available_memory() // 2


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_allocation(what: str, shape, dtype, spec_id: str) -> None:
    """ResourceError before allocating ``shape`` of ``dtype`` beyond :func:`memory_limit` (a config or header asked for it)."""
    elements = math.prod(int(dim) for dim in shape)
    nbytes = elements * np.dtype(dtype).itemsize
    limit = memory_limit()
    if nbytes > limit:
        raise ResourceError(what, f"would allocate {_bytes(nbytes)} ({list(shape)[:8]} {np.dtype(dtype).name}), over the memory limit of "
                            f"{_bytes(limit)} (set {MEMORY_LIMIT_ENV} or mla_ref.checks.set_memory_limit to change it)", spec_id)


def _bytes(nbytes: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}" if nbytes < 2**70 else f"2^{nbytes.bit_length() - 1} bytes"
    return f"{nbytes} bytes"


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


def finite_output(name: str, array: np.ndarray, spec_id: str) -> np.ndarray:
    """``array`` unchanged if finite; else NumericError naming the step: finite inputs gave NaN / inf (overflow, 0/0)."""
    if not all_finite(array):
        index = first_nonfinite(array)
        raise NumericError(name, f"{array[index]} at index {index} from finite inputs and weights (overflow or 0/0 in {array.dtype}); "
                           "no output is returned", spec_id)
    return array


def cannot_change(array: np.ndarray) -> bool:
    """Whether ``array`` cannot be written in place: it and every array it views are read-only, down to owned memory or ``bytes``."""
    while isinstance(array, np.ndarray):
        if array.flags.writeable:
            return False
        array = array.base
    return array is None or isinstance(array, bytes)


def checked_weight(name: str, value: np.ndarray, dtype, spec_id: str) -> np.ndarray:
    """A float weight cast to ``dtype`` and checked finite.

    The cast and the check are remembered only for an array that cannot change in place
    (:func:`cannot_change`: read-only, as :func:`mla_ref.weights.generate_weights` returns them);
    any other array is cast and checked on every call, so an in-place update (a NaN written
    into it, a scaled row) is never missed. Freeze your own weights with
    ``array.setflags(write=False)`` to skip the repeated work (a float32 decode step of
    DeepSeek-V2-Lite attention: 24% faster; float64: 5%).
    """
    dtype = np.dtype(dtype)
    frozen = cannot_change(value)
    key = (id(value), dtype.str)
    entry = _CHECKED_WEIGHTS.get(key) if frozen else None
    if entry is not None and entry[0]() is value:
        return value if entry[1] is None else entry[1]
    cast = value.astype(dtype, copy=False)
    if not all_finite(cast):
        index = first_nonfinite(cast)
        raise WeightError(name, f"contains {cast[index]} at index {index}; expected finite values", spec_id)
    if frozen:
        if cast is not value:
            cast.setflags(write=False)
        _CHECKED_WEIGHTS[key] = (weakref.ref(value, lambda _, key=key: _CHECKED_WEIGHTS.pop(key, None)), None if cast is value else cast)
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
