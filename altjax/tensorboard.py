"""TensorBoard event files for scalars, written without TensorFlow, tensorboardX or torch.

An event file is a TFRecord file (:mod:`altjax.data.tfrecord` framing) of ``tensorflow.Event``
protocol buffers. Only the few fields scalars need are encoded, by hand:

    Event:       wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
                 summary = 5 (Summary), session_log = 7 (SessionLog)
    Summary:     value = 1 (repeated Value)
    Value:       tag = 1 (string), simple_value = 2 (float)
    SessionLog:  status = 1 (enum; START = 1)

A resumed run passes ``purge_step``: the file starts with a SessionLog START at that step, which
tells TensorBoard to drop what earlier files logged at that step and after (the steps the run
repeats after going back to its checkpoint).

``logdir`` may be remote (``gs://...``). An object store cannot append to an object, so there the
writer keeps the file's bytes and rewrites the whole object at each :meth:`EventWriter.flush`
(readers see it whole, as of a flush); past :data:`REMOTE_FILE_BYTES` it starts a new file, which
TensorBoard reads after the earlier ones, so that a long run does not upload an ever larger file.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Optional

from etils import epath

from altjax import fsutil
from altjax.data.tfrecord import frame

REMOTE_FILE_BYTES = 4 << 20


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields are encoded as their two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _event(step: int, *, file_version: Optional[str] = None, summary: Optional[bytes] = None,
           session_start: bool = False) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    if session_start:
        out += _bytes_field(7, _varint(1 << 3) + _varint(1))
    return out


def scalar_summary(tag: str, value: float) -> bytes:
    """A ``Summary`` holding one scalar."""
    value_message = _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value))
    return _bytes_field(1, value_message)


class EventWriter:
    """Appends scalar events to a new event file in ``logdir`` (what TensorBoard reads); ``path``
    is the file being written."""

    def __init__(self, logdir: str, *, purge_step: Optional[int] = None):
        self.logdir = os.fspath(logdir)
        self._remote = fsutil.is_remote(self.logdir)
        if not self._remote:  # objects need no parent directories
            os.makedirs(self.logdir, exist_ok=True)
        self._file = None
        self._open()
        if purge_step is not None:
            self._write(_event(purge_step, session_start=True))
        self.flush()

    def _open(self) -> None:
        self.path = os.path.join(self.logdir, f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}")
        if self._remote:
            self._buffer, self._flushed = bytearray(), -1
        else:
            self._file = open(self.path, "ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        if self._remote:
            self._buffer += frame(event)
        else:
            self._file.write(frame(event))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Logs ``value`` under ``tag`` at ``step``."""
        self._write(_event(step, summary=scalar_summary(tag, value)))

    def flush(self) -> None:
        if not self._remote:
            self._file.flush()
            return
        if len(self._buffer) != self._flushed:
            epath.Path(self.path).write_bytes(bytes(self._buffer))
            self._flushed = len(self._buffer)
        if self._flushed > REMOTE_FILE_BYTES:
            self._open()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()
