"""The safetensors format, read and written one tensor at a time with plain file I/O.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian data. The safetensors package
memory-maps the file: every page it touches stays in the process's resident memory until the file
is closed, so converting a model through it holds the checkpoint twice (the mapping and the
converted arrays). Reading each tensor into its own buffer with ``readinto``, and writing each
tensor as it is produced, keeps the peak near one copy of the model. Every offset is checked
against the file size when the file is opened, so a truncated file is reported before any
conversion starts.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np
from etils import epath

from altjax import fsutil

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Headers hold names, shapes and offsets only; anything near this size is not a safetensors file.
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
    """The file is not a complete, well-formed safetensors file."""


class SafetensorsReader(Mapping[str, np.ndarray]):
    """A ``.safetensors`` file as a mapping name -> array; each lookup reads that tensor from disk.

    ``shape(name)`` and ``dtype(name)`` answer from the header. Raises ``SafetensorsError`` naming
    the file when the header is malformed or the file is shorter than the header says.
    """

    def __init__(self, file: str | os.PathLike):
        self.file = os.fspath(file)
        size = os.path.getsize(self.file)
        with open(self.file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.file}: {size} bytes, too short for a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise SafetensorsError(f"{self.file}: header length {length} does not fit the file's {size} bytes")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.file}: the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.file}: the header is not a JSON object")
        self.metadata: Optional[dict[str, str]] = header.pop("__metadata__", None)
        self._start = 8 + length
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{self.file}: malformed header entry for {name!r} ({e!r})") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise SafetensorsError(f"{self.file}: {name!r} has {end - begin} bytes for shape {shape} {dtype}")
            if self._start + end > size:
                raise SafetensorsError(f"{self.file}: truncated: {name!r} ends at byte {self._start + end}, "
                                       f"the file has {size}")
            self._entries[name] = (dtype, shape, begin, end)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        out = np.empty(shape, dtype=dtype)
        with open(self.file, "rb") as f:
            f.seek(self._start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise SafetensorsError(f"{self.file}: truncated while reading {name!r} ({got} of {end - begin} bytes)")
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_metadata(file: str | os.PathLike) -> Optional[dict[str, str]]:
    """The ``__metadata__`` of a safetensors file's header, read without the tensors; ``None``
    when the file has none or is not a readable safetensors file (never raises for those).
    ``file`` may be remote (``gs://...``): only the header is downloaded."""
    try:
        with (epath.Path(file).open("rb") if fsutil.is_remote(file) else open(file, "rb")) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                return None
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def _shape_dtype(tensors: Mapping[str, Any], name: str) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(tensors, "shape") and hasattr(tensors, "dtype"):
        return tuple(tensors.shape(name)), np.dtype(tensors.dtype(name))
    a = np.asarray(tensors[name])
    return a.shape, a.dtype


def write_safetensors(file: str | os.PathLike, tensors: Mapping[str, Any], names=None, *,
                      metadata: Optional[dict[str, str]] = None) -> int:
    """Writes ``tensors[name]`` for each of ``names`` (default: all) to ``file``; returns the bytes written.

    The header is built from ``tensors.shape(name)`` / ``tensors.dtype(name)`` when the mapping
    offers them (lazy converters do), so each tensor is produced, written and dropped in turn.
    """
    names = list(tensors) if names is None else list(names)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    specs = {}
    offset = 0
    for name in names:
        shape, dtype = _shape_dtype(tensors, name)
        if dtype not in NAMES:
            raise SafetensorsError(f"{name!r}: dtype {dtype} has no safetensors name")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        specs[name] = (shape, dtype)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    try:
        with open(file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name in names:
                array = np.asarray(tensors[name])
                if (array.shape, array.dtype) != specs[name]:
                    raise SafetensorsError(f"{name!r}: produced {array.shape} {array.dtype}, announced {specs[name]}")
                f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
                del array
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a failed write names no file: say which
            raise OSError(e.errno, e.strerror, os.fspath(file)) from None
        raise
    return 8 + len(encoded) + offset
