"""TFRecord files without TensorFlow: writing, indexing for random access, and checked reading.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

where ``masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2**32) of the CRC-32C
(Castagnoli) checksum, as TensorFlow's ``tf.io.TFRecordWriter`` writes them. Records are
usually serialised ``tf.train.Example`` protos (see :mod:`altjax.data.example`).
"""
from __future__ import annotations

import os
import struct
from typing import Iterable

import google_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class CorruptRecordError(ValueError):
    """A record whose framing or checksum is wrong (a damaged or truncated file)."""


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC-32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record framed for a TFRecord file."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes the records to a TFRecord file (atomically: a temporary file renamed when complete).

    Returns the number of records written.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    with open(tmp, "wb") as f:
        for record in records:
            f.write(frame(record))
            count += 1
    os.replace(tmp, path)
    return count


def index_tfrecord(path: str | os.PathLike) -> tuple[list[tuple[int, int]], str | None]:
    """The (offset, length) of each record's data, read from the length headers alone.

    Returns the index and None, or the index of the records before the first damaged header and a
    description of the damage: a header whose checksum fails makes every later offset unreliable,
    so reading stops there (the records after it are lost, as they would be to TensorFlow).
    """
    path = os.fspath(path)
    index: list[tuple[int, int]] = []
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            header = os.pread(fd, _HEADER.size, offset)
            if len(header) < _HEADER.size:
                return index, f"{path}: truncated header at byte {offset}"
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                return index, f"{path}: corrupt length header at byte {offset}"
            end = offset + _HEADER.size + length + _FOOTER.size
            if end > size:
                return index, f"{path}: record at byte {offset} is truncated ({length} bytes announced)"
            index.append((offset + _HEADER.size, length))
            offset = end
    finally:
        os.close(fd)
    return index, None


def read_record(fd: int, offset: int, length: int, where: str = "") -> bytes:
    """The data of one indexed record, its checksum verified (CorruptRecordError otherwise)."""
    buffer = os.pread(fd, length + _FOOTER.size, offset)
    if len(buffer) != length + _FOOTER.size:
        raise CorruptRecordError(f"{where}: record at byte {offset} is truncated")
    data = buffer[:length]
    if masked_crc32c(data) != _FOOTER.unpack(buffer[length:])[0]:
        raise CorruptRecordError(f"{where}: record at byte {offset} fails its checksum")
    return data


def iterate_tfrecord(path: str | os.PathLike) -> Iterable[bytes]:
    """The records of a file in order, checksums verified (CorruptRecordError on damage)."""
    index, damage = index_tfrecord(path)
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        for offset, length in index:
            yield read_record(fd, offset, length, os.fspath(path))
    finally:
        os.close(fd)
    if damage:
        raise CorruptRecordError(damage)
