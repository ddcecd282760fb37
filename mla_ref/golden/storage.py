"""Golden file formats: ``.npz`` (never pickled) and safetensors, and tensor digests.

safetensors is written and read with NumPy alone: an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the raw little-endian bytes of each tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import GoldenError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-\[\]]+$")

SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                      "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "bool": "BOOL"}
NUMPY_DTYPES = {code: np.dtype(name) for name, code in SAFETENSORS_DTYPES.items()}


def check_tensor_name(name: str) -> None:
    """Tensor names are plain words, dots, colons and brackets: no path separators, no spaces."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise GoldenError("tensor name", f"expected letters, digits and _ . : - [ ], got {name!r}", "GOLDEN.storage")


def _plain_array(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiub" or array.dtype.byteorder == ">":
        raise GoldenError(name, f"expected a numeric or bool array in native byte order, got dtype {array.dtype}", "GOLDEN.storage")
    return _c_order(array)


def _c_order(array: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


def tensor_digest(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-order bytes of a tensor."""
    array = _c_order(np.asarray(array))
    digest = hashlib.sha256(f"{array.dtype.str}|{','.join(map(str, array.shape))}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def write_npz(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write tensors to an uncompressed ``.npz`` (plain arrays only)."""
    arrays = {}
    for name, value in tensors.items():
        check_tensor_name(name)
        arrays[name] = _plain_array(name, value)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` with ``allow_pickle=False``; a pickled member is a ``GoldenError``."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(str(path), "golden file is missing", "GOLDEN.storage")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as error:
        raise GoldenError(str(path), f"refused to load (pickled or object data): {error}", "GOLDEN.storage") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise GoldenError(str(path), f"not a readable .npz file: {error}", "GOLDEN.storage") from None


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors in the safetensors format (little endian, dtypes of ``SAFETENSORS_DTYPES``)."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    blobs, offset = [], 0
    for name, value in tensors.items():
        check_tensor_name(name)
        array = _plain_array(name, value)
        if array.dtype.name not in SAFETENSORS_DTYPES:
            raise GoldenError(name, f"dtype {array.dtype} has no safetensors code", "GOLDEN.storage")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for blob in blobs:
            handle.write(blob)


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file written by :func:`write_safetensors` (or any tool using these dtypes)."""
    data = Path(path).read_bytes()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
    except (struct.error, ValueError) as error:
        raise GoldenError(str(path), f"not a safetensors file: {error}", "GOLDEN.storage") from None
    metadata = header.pop("__metadata__", {})
    body = data[8 + length:]
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = NUMPY_DTYPES[entry["dtype"]].newbyteorder("<")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(entry["shape"]).astype(dtype.newbyteorder("="))
    return tensors, metadata
