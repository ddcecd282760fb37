"""Golden file formats: ``.npz`` (never pickled) and safetensors, and tensor digests.

safetensors is written and read with NumPy alone: an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the raw little-endian bytes of each tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..checks import memory_limit
from ..errors import GoldenError, shown

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


TEMPORARY_MARK = ".tmp-"  # .<name>.tmp-<pid>: a file being written; renamed into place when complete
MAX_SAFETENSORS_HEADER = 100 * 2**20
COMPRESSED_INFLATION = 100  # a compressed member without declared sizes may inflate to this many times its size (min 64 MiB)


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on any failure remove it."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise GoldenError(str(path), f"cannot be written: {error.strerror or error}", "GOLDEN.storage") from None
    finally:
        if temporary.exists():
            temporary.unlink()


def write_npz(path: Path, tensors: Mapping[str, np.ndarray], *, atomic: bool = True) -> Path:
    """Write tensors to an uncompressed ``.npz`` (plain arrays only); ``atomic``: via a temporary file renamed into place.

    With ``atomic=False`` the temporary file is left for the caller to rename (it is returned)."""
    arrays = {}
    for name, value in tensors.items():
        check_tensor_name(name)
        arrays[name] = _plain_array(name, value)
    path = Path(path)
    make_folder(path.parent)
    if not atomic:
        temporary = temporary_path(path)
        _save_npz(temporary, arrays)
        return temporary
    with atomic_file(path) as temporary:
        _save_npz(temporary, arrays)
    return path


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    try:
        with open(path, "wb") as handle:  # a file object: np.savez would append .npz to a name without it
            np.savez(handle, **arrays)
    except OSError as error:
        raise GoldenError(str(path), f"cannot be written: {error.strerror or error}", "GOLDEN.storage") from None


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and parents); a file in the way or an unwritable place is a GoldenError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GoldenError(str(folder), "exists and is not a folder", "GOLDEN.storage")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GoldenError(str(folder), f"cannot be created: {error.strerror or error}", "GOLDEN.storage") from None


def _plain_file(path: Path) -> None:
    if path.is_symlink():
        raise GoldenError(str(path), "is a symbolic link; golden files are plain files (a link may point outside the folder)", "GOLDEN.storage")
    if not path.is_file():
        raise GoldenError(str(path), "golden file is missing", "GOLDEN.storage")


def read_npz(path: Path, declared: Mapping[str, Mapping] | None = None) -> dict[str, np.ndarray]:
    """Read an ``.npz`` without pickles, inflating no member beyond what it may hold.

    Each member's npy header is read first: object dtypes are refused; its size must match the
    bytes the member holds, the ``declared`` tensors (a manifest entry's ``{name: {dtype, shape}}``)
    when given, and the memory limit (mla_ref.checks.memory_limit). A compressed member without
    declared sizes may inflate at most COMPRESSED_INFLATION times (an npz zip bomb). Symbolic
    links are refused.
    """
    path = Path(path)
    _plain_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if declared is not None and {m.filename.removesuffix(".npy") for m in members} != set(declared):
                raise GoldenError(str(path), f"members {sorted(m.filename for m in members)[:8]} disagree with the declared tensors "
                                  f"{sorted(declared)[:8]}", "GOLDEN.storage")
            return {member.filename.removesuffix(".npy"): _read_member(path, archive, member, declared) for member in members}
    except GoldenError:  # a refused member, already naming the file and why (a GoldenError is a ValueError too)
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
        raise GoldenError(str(path), f"not a readable .npz file: {shown(str(error), 200)}", "GOLDEN.storage") from None


def _read_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo, declared: Mapping[str, Mapping] | None) -> np.ndarray:
    name = member.filename.removesuffix(".npy")
    where, member_name = str(path), f"member {shown(member.filename, 60)}"
    if not member.filename.endswith(".npy"):
        raise GoldenError(where, f"{member_name}: not an .npy member", "GOLDEN.storage")
    limit = memory_limit()
    if member.compress_type != zipfile.ZIP_STORED and declared is None:
        limit = min(limit, max(COMPRESSED_INFLATION * member.compress_size, 64 * 2**20))
    if member.file_size > limit:
        raise GoldenError(where, f"{member_name} inflates to {member.file_size} bytes, over the limit of {limit}", "GOLDEN.storage")
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise GoldenError(where, f"{member_name}: unsupported npy version {version}", "GOLDEN.storage")
        shape, fortran, dtype = readers[version](handle, max_header_size=10000)
        if dtype.hasobject or dtype.kind not in "fiub":
            raise GoldenError(where, f"refused to load (pickled or object data): {member_name} has dtype {dtype}", "GOLDEN.storage")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != member.file_size - handle.tell():
            raise GoldenError(where, f"{member_name}: header declares {list(shape)[:8]} {dtype} ({nbytes} bytes), the member holds "
                              f"{member.file_size - handle.tell()}", "GOLDEN.storage")
        if declared is not None:
            entry = declared.get(name, {})
            if list(shape) != list(entry.get("shape", [])) or dtype.str != entry.get("dtype"):
                raise GoldenError(where, f"{member_name} holds {dtype.str} {list(shape)[:8]}, the manifest declares {entry.get('dtype')} "
                                  f"{shown(entry.get('shape'))}", "GOLDEN.storage")
        data = handle.read(nbytes)
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.copy()


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors in the safetensors format (little endian, dtypes of ``SAFETENSORS_DTYPES``), via a temporary file."""
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
    path = Path(path)
    make_folder(path.parent)
    with atomic_file(path) as temporary, open(temporary, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for blob in blobs:
            handle.write(blob)


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file, checking its header before reading any tensor.

    The header length must fit the file; every entry needs a known dtype, a shape of ints >= 0 and
    ``data_offsets`` inside the body whose span is exactly the shape's bytes; ``__metadata__`` maps
    strings to strings. The file must fit the memory limit. Anything else is a GoldenError.
    """
    path = Path(path)
    _plain_file(path)
    where = str(path)
    size = path.stat().st_size
    if size > memory_limit():
        raise GoldenError(where, f"{size} bytes, over the memory limit of {memory_limit()}", "GOLDEN.storage")
    data = path.read_bytes()
    if len(data) < 8:
        raise GoldenError(where, "not a safetensors file: shorter than its 8-byte header length", "GOLDEN.storage")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, MAX_SAFETENSORS_HEADER):
        raise GoldenError(where, f"header length {length} exceeds the {len(data) - 8} bytes after it", "GOLDEN.storage")
    try:
        header = json.loads(data[8:8 + length])
    except (ValueError, RecursionError) as error:
        raise GoldenError(where, f"not a safetensors file: header is not JSON ({shown(str(error), 120)})", "GOLDEN.storage") from None
    if not isinstance(header, dict):
        raise GoldenError(where, f"header: expected a JSON object, got {type(header).__name__}", "GOLDEN.storage")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise GoldenError(f"{where}: __metadata__", "expected a mapping of strings to strings", "GOLDEN.storage")
    body = memoryview(data)[8 + length:]
    return {name: _safetensors_tensor(f"{where}: {shown(name, 60)}", entry, body) for name, entry in header.items()}, metadata


def _safetensors_tensor(where: str, entry, body: memoryview) -> np.ndarray:
    if not isinstance(entry, dict):
        raise GoldenError(where, "header entry is not an object", "GOLDEN.storage")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in NUMPY_DTYPES:
        raise GoldenError(f"{where}.dtype", f"expected one of {sorted(NUMPY_DTYPES)}, got {shown(dtype)}", "GOLDEN.storage")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise GoldenError(f"{where}.shape", f"expected a list of ints >= 0, got {shown(shape)}", "GOLDEN.storage")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(body)):
        raise GoldenError(f"{where}.data_offsets", f"expected [begin, end] within the {len(body)}-byte body, got {shown(offsets)}", "GOLDEN.storage")
    numpy_dtype = NUMPY_DTYPES[dtype].newbyteorder("<")
    nbytes = math.prod(shape) * numpy_dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise GoldenError(f"{where}.data_offsets", f"span {offsets[1] - offsets[0]} bytes, the shape {shown(shape)} {dtype} needs {nbytes}", "GOLDEN.storage")
    return np.frombuffer(body[offsets[0]:offsets[1]], dtype=numpy_dtype).reshape(shape).astype(numpy_dtype.newbyteorder("="))
