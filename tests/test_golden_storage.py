"""Golden file formats: npz never unpickles, safetensors round-trips, digests see every byte."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mla_ref.errors import GoldenError
from mla_ref.golden.storage import read_npz, read_safetensors, tensor_digest, write_npz, write_safetensors


def sample_tensors():
    rng = np.random.default_rng(0)
    return {"q_nope": rng.standard_normal((2, 3, 4)), "ids": np.array([[3, 1], [0, 2]], np.int64),
            "visible": np.tri(3, dtype=bool), "lse": rng.standard_normal(5).astype(np.float32), "empty": np.zeros((0, 4))}


def test_npz_round_trip(tmp_path):
    tensors = sample_tensors()
    write_npz(tmp_path / "case.npz", tensors)
    loaded = read_npz(tmp_path / "case.npz")
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)


def test_npz_with_a_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, payload=np.array([{"a": 1}], dtype=object))
    with pytest.raises(GoldenError, match=r"evil.npz: refused to load \(pickled or object data\)"):
        read_npz(path)


def test_object_arrays_cannot_be_written(tmp_path):
    with pytest.raises(GoldenError, match=r"payload: expected a numeric or bool array"):
        write_npz(tmp_path / "x.npz", {"payload": np.array([None], dtype=object)})


@pytest.mark.parametrize("name", ["../escape", "a/b", "with space", ""])
def test_tensor_names_with_separators_are_refused(tmp_path, name):
    with pytest.raises(GoldenError, match="tensor name"):
        write_npz(tmp_path / "x.npz", {name: np.zeros(1)})


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(GoldenError, match="golden file is missing"):
        read_npz(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(GoldenError, match="not a readable .npz file"):
        read_npz(tmp_path / "bad.npz")


def test_safetensors_round_trip_and_layout(tmp_path):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "case.safetensors", tensors, {"case": "mla.prefill/tiny/seed0"})
    loaded, metadata = read_safetensors(tmp_path / "case.safetensors")
    assert metadata == {"case": "mla.prefill/tiny/seed0"}
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)
    raw = (tmp_path / "case.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert length % 8 == 0 and header["ids"]["dtype"] == "I64" and header["q_nope"]["shape"] == [2, 3, 4]
    begin, end = header["lse"]["data_offsets"]
    assert np.array_equal(np.frombuffer(raw[8 + length + begin: 8 + length + end], "<f4"), tensors["lse"])


def test_digest_sees_dtype_shape_and_bytes():
    x = np.arange(6, dtype=np.float64)
    assert tensor_digest(x) == tensor_digest(x.copy())
    assert tensor_digest(x) != tensor_digest(x.reshape(2, 3))
    assert tensor_digest(x) != tensor_digest(x.astype(np.float32))
    y = x.copy()
    y[3] = np.nextafter(y[3], 10)
    assert tensor_digest(x) != tensor_digest(y)


def test_safetensors_refuses_a_dtype_without_a_code_and_a_file_that_is_not_safetensors(tmp_path):
    if np.dtype(np.longdouble).itemsize > 8:  # extended precision: a float kind with no safetensors code
        with pytest.raises(GoldenError, match="has no safetensors code"):
            write_safetensors(tmp_path / "long.safetensors", {"x": np.zeros(2, np.longdouble)})
    (tmp_path / "text.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(GoldenError, match="not a safetensors file"):
        read_safetensors(tmp_path / "text.safetensors")
