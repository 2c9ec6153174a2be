"""TensorBoard event files, written without TensorFlow, TensorBoard or protobuf installed.

An event file is a sequence of TFRecords (a little-endian uint64 length, the masked CRC-32C of
those 8 bytes, the data, the masked CRC-32C of the data), each holding one serialized
``tensorflow.Event`` protocol buffer; the first carries ``file_version = "brain.Event:2"``,
the others a ``Summary`` of ``simple_value`` scalars. Only the fields used here are encoded:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
              Summary summary = 5; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }

Guarantees: every record is flushed when ``scalars`` returns, so a TensorBoard reading the
directory while a run goes on sees each step as it is written; a file's name contains
``tfevents`` (what TensorBoard looks for) and is unique per writer. tests/test_exporters.py
reads the files back with TensorBoard's own reader.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses. ``crc32c(b"123456789") == 0xE3069283``."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC rotated and offset, as TFRecord stores it (a CRC of data holding CRCs)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord around ``data``."""
    head = struct.pack("<Q", len(data))
    return (head + struct.pack("<I", masked_crc32c(head)) + data
            + struct.pack("<I", masked_crc32c(data)))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
    """A serialized ``Event`` (fields as in the module docstring)."""
    if step < 0:
        raise ValueError(f"step {step} must be >= 0")
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                         + struct.pack("<f", value))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


class EventFileWriter:
    """Appends scalar events to a new event file in ``logdir`` (made if missing)."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.logdir / (f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                                   f"{os.getpid()}.{id(self) & 0xFFFF}")
        self._file: BinaryIO | None = open(self.path, "ab")  # noqa: SIM115 (closed in close)
        self._write(event(now, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        assert self._file is not None, "writer closed"
        self._file.write(record(data))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """One event at ``step`` with these tag -> value scalars; non-finite values are left
        out (TensorBoard would draw them as gaps anyway)."""
        finite = {k: float(v) for k, v in values.items() if math.isfinite(v)}
        if finite:
            self._write(event(time.time() if wall_time is None else wall_time, step,
                              scalars=finite))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
