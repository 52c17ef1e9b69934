"""One data file of a snapshot being written: its header, chunks appended at ``ALIGN``, writes
that keep the page cache in large folios, writeback started as it grows, one fsync at the end.

A data file is ``DATA_HEADER`` (magic, format version, shard number) then chunks, each at a
multiple of ``ALIGN`` (docs/FORMAT.md); the manifest says where each chunk lies.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from time import perf_counter

from snapd.format.codecs import Encoded

DATA_MAGIC = b"SNAPDDAT"
DATA_HEADER = struct.Struct("<8sII")  # magic, format version, shard number
ALIGN = 64
_ZEROS = bytes(ALIGN)
WRITEBACK_BYTES = 32 << 20
# Data reaches the file in writes that end on a multiple of this (the bytes after the last multiple
# wait, copied, for the next chunk): the page cache then holds the file in 2 MiB folios, which a
# restore's mapping maps whole (one fault, not 32). Writes that end elsewhere leave small folios at
# every seam: touching the 1.5 GiB bench state through its mapping took 34 ms, against 22 ms
# (docs/benchmarks.md). 2 MiB: the PMD size of x86-64 and arm64 with 4 KiB pages.
WRITE_ALIGN = 2 << 20
# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _sync_file_range() -> ctypes._CFuncPtr | None:
    fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class DataFile:
    """A data file being written (``append`` chunks, then ``finish``)."""

    def __init__(self, path: Path, number: int) -> None:
        self.path = path
        self.number = number
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0  # bytes appended (the file's size once finished)
        self.io_seconds = 0.0  # time blocked in write/writeback/fsync: what the disk costs us
        self._written = 0  # bytes in the file so far
        self._held = bytearray()  # bytes [_written, size): past the last WRITE_ALIGN, not written yet
        self._flushed = 0  # bytes whose writeback has been started
        self._sfr = _sync_file_range()
        self._write([DATA_HEADER.pack(DATA_MAGIC, 1, number)])

    def _writeback(self) -> None:
        """Keep the disk busy while we encode, instead of all at the final fsync.

        Every WRITEBACK_BYTES: start writeback of the new range, and wait for
        the range two steps back, so dirty pages stay bounded and the final
        fsync has little left to do (the usual streaming-write pattern).
        """
        if self._sfr is None:
            return
        t = perf_counter()
        while self._written - self._flushed >= WRITEBACK_BYTES:
            self._sfr(self.fd, self._flushed, WRITEBACK_BYTES, _WRITE)
            back = self._flushed - 2 * WRITEBACK_BYTES
            if back >= 0:
                self._sfr(self.fd, back, WRITEBACK_BYTES, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self._flushed += WRITEBACK_BYTES
        self.io_seconds += perf_counter() - t

    def _write(self, parts: list) -> None:
        t = perf_counter()
        self._write_all(parts)
        self.io_seconds += perf_counter() - t

    def _write_all(self, parts: list) -> None:
        """Append ``parts``: written up to the last WRITE_ALIGN multiple, the rest held."""
        views = [memoryview(p).cast("B") for p in parts]
        self.size += sum(v.nbytes for v in views)
        now = self.size - self.size % WRITE_ALIGN - self._written
        if now <= 0:
            for v in views:
                self._held += v
            return
        if self._held:
            views.insert(0, memoryview(self._held))
        out: list[memoryview] = []
        while views and now >= views[0].nbytes:
            now -= views[0].nbytes
            out.append(views.pop(0))
        if now:
            out.append(views[0][:now])
            views[0] = views[0][now:]
        self._writev(out)
        self._held = bytearray().join(views)  # (a copy: the caller reuses its buffers after this)

    def _writev(self, views: list[memoryview]) -> None:
        total = sum(v.nbytes for v in views)
        done = 0
        while done < total:  # writev may write less than asked
            n = os.writev(self.fd, views[:512])
            done += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        self._written += total

    def append(self, enc: Encoded) -> int:
        pad = -self.size % ALIGN
        if pad:
            self._write([_ZEROS[:pad]])
        offset = self.size
        self._write(enc.parts)
        self._writeback()
        return offset

    def finish(self) -> None:
        t = perf_counter()
        if self._held:
            self._writev([memoryview(self._held)])
            self._held = bytearray()
        os.fsync(self.fd)
        self.io_seconds += perf_counter() - t
        os.close(self.fd)
        self.fd = -1


def renumber(path: Path, number: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack("<I", number), 12)  # (DATA_HEADER's shard number)
        os.fsync(fd)
    finally:
        os.close(fd)
