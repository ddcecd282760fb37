"""Adapter outputs as NumPy arrays (mla_ref/conformance/arrays.py, spec/golden.yaml checker.outputs), without the frameworks.

Stand-ins with the attributes the converter looks at (a torch tensor's ``detach``/``cpu``/``numpy``,
an ``__array__`` object, an object with only ``.numpy()``); the real torch and JAX outputs go
through it in the torch, JAX and HF adapter tests of the slow step.
"""

from __future__ import annotations

import numpy as np
import pytest

from mla_ref.conformance.arrays import as_array, dtype_unit_roundoff

VALUES = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)


class TorchLike:
    """A CPU tensor as torch has it: ``numpy()`` refuses dtypes NumPy lacks; ``float()`` widens to float32."""

    def __init__(self, values: np.ndarray, dtype: str, numpy_refuses: bool = False):
        self.values, self.dtype, self.numpy_refuses = values, dtype, numpy_refuses
        self.detached = self.moved = False

    def detach(self):
        self.detached = True
        return self

    def cpu(self):
        self.moved = True
        return self

    def numpy(self):
        if self.numpy_refuses:
            raise TypeError(f"Got unsupported ScalarType {self.dtype}")
        return self.values

    def float(self):
        return TorchLike(self.values.astype(np.float32), "torch.float32")


class ArrayLike:
    def __init__(self, values: np.ndarray):
        self.values, self.dtype = values, values.dtype

    def __array__(self, dtype=None, copy=None):
        return self.values


class NumpyMethodOnly:
    def numpy(self):
        return VALUES


class CpuMethodOnly:
    """A device array without ``detach``: moved with ``cpu()``, then converted with ``numpy()``."""

    def cpu(self):
        return NumpyMethodOnly()


@pytest.mark.parametrize("numpy_refuses", [False, True], ids=["numpy()", "bfloat16 through float()"])
def test_a_torch_tensor_is_detached_moved_to_the_cpu_and_converted(numpy_refuses):
    tensor = TorchLike(VALUES, "torch.bfloat16", numpy_refuses)
    array, source = as_array(tensor)
    np.testing.assert_array_equal(array, VALUES)
    assert array.dtype == np.float32 and source == "torch.bfloat16" and tensor.detached and tensor.moved


@pytest.mark.parametrize("value, expected, source", [
    (ArrayLike(VALUES.astype(np.float16)), VALUES.astype(np.float16), "float16"),
    (NumpyMethodOnly(), VALUES, "NumpyMethodOnly"),
    (CpuMethodOnly(), VALUES, "CpuMethodOnly"),
    ([[1, 2], [3, 4]], np.array([[1, 2], [3, 4]]), "list"),
    ((True, False), np.array([True, False]), "tuple"),
    (2.5, np.array(2.5), "float"),
], ids=["__array__", "numpy-method", "cpu-method", "nested-list", "bool-tuple", "scalar"])
def test_array_likes_sequences_and_scalars_keep_values_dtype_and_source(value, expected, source):
    array, named = as_array(value)
    np.testing.assert_array_equal(array, expected)
    assert array.dtype == expected.dtype and named == source


@pytest.mark.parametrize("value, message", [
    ([[1.0], [2.0, 3.0]], "a ragged nested list (rows of different lengths) is no array"),
    ([1.0, None], "a nested list of NoneType, float is no numeric array"),
    (None, "a nested NoneType of NoneType is no numeric array"),
    (np.array(["a", "b"]), "not a numeric array: dtype <U1 (from ndarray)"),
    (np.array([1 + 2j]), "not a numeric array: dtype complex128 (from ndarray)"),
], ids=["ragged", "none-in-list", "none", "strings", "complex"])
def test_what_is_no_numeric_array_is_a_value_error_saying_why(value, message):
    with pytest.raises(ValueError) as error:
        as_array(value)
    assert message in str(error.value)


def test_ml_dtypes_bfloat16_is_widened_to_float32_exactly():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    stored = VALUES.astype(ml_dtypes.bfloat16)  # every value of VALUES is a bfloat16 value
    array, source = as_array(stored)
    assert array.dtype == np.float32 and source == "bfloat16"
    np.testing.assert_array_equal(array, VALUES)


@pytest.mark.parametrize("name, significand_bits", [
    ("torch.float64", 53), ("double", 53), ("float32", 24), ("torch.float", 24), ("float16", 11), ("torch.half", 11),
    ("torch.bfloat16", 8), ("bfloat16", 8), ("torch.float8_e4m3fn", 4), ("float8_e5m2", 3),
])
def test_the_unit_roundoff_of_a_float_dtype_is_two_to_minus_its_significand_bits(name, significand_bits):
    """u = 2^-p with p the significand bits, the implicit one included (IEEE 754; bf16 and e4m3 / e5m2 from their layouts)."""
    assert dtype_unit_roundoff(name) == 2.0 ** -significand_bits


@pytest.mark.parametrize("name", ["int32", "torch.int64", "bool", "float8_unknown", ""])
def test_a_dtype_that_is_no_known_float_has_no_unit_roundoff(name):
    assert dtype_unit_roundoff(name) is None
