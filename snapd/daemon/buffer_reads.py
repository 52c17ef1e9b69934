"""Reading and writing a snapshot's bytes in its host buffer without trusting the buffer's size.

A client maps its leased buffer writable, so it can truncate the file under the daemon; a read
through the daemon's mapping past the new end is a SIGBUS, and the daemon, with every other job's
snapshots, dies. So the daemon's own accesses to a leased buffer go through the file: the flush
and the codec sample copy each chunk out with ``preadv`` (a file cut short makes it return less,
never fault) into scratch buffers reused from snapshot to snapshot, and encode from there; inline
bytes go in with ``pwrite``. A cut-short buffer fails its snapshot naming the client's doing.
That costs one memcpy per byte of the flush, so it is done for the buffers of other uids only
(``BufferReads``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from snapd.errors import ProtocolError
from snapd.format.leaves import TensorLeaf

log = logging.getLogger(__name__)


class ScratchPool:
    """Chunk-sized buffers, touched once and reused: fresh memory on every chunk would be
    faulted in at first-touch speed (~0.6 GB/s)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes > self.chunk_bytes:
            return np.empty(nbytes, np.uint8)  # (a chunk is at most chunk_bytes: not reached)
        with self._lock:
            buf = self._free.pop() if self._free else None
        return (buf if buf is not None else np.empty(self.chunk_bytes, np.uint8))[:nbytes]

    def give(self, buf: np.ndarray) -> None:
        base = buf.base if isinstance(buf.base, np.ndarray) else buf
        if base.nbytes == self.chunk_bytes:
            with self._lock:
                self._free.append(base)


class BufferReads:
    """One snapshot's reads of its host buffer file (``base``: the address the daemon maps it at,
    so a leaf's view tells its offset; ``end``: the bytes the snapshot spans).

    ``copy``: the buffer serves a uid other than the daemon's, which could truncate it on
    purpose while the chunks are read: every chunk is copied out with ``preadv``. A client of the
    daemon's own uid could as well kill the daemon outright, so for its buffers the mapping is
    read, after checking the file still spans the snapshot before each chunk (a buggy client's
    truncation fails its snapshot; the copy costs 17-20% of a flush: docs/PROTOCOL.md)."""

    def __init__(self, path: Path, base: int, end: int, scratch: ScratchPool, copy: bool) -> None:
        self.path = path
        self.base = base
        self.end = end
        self.scratch = scratch
        self.copy = copy
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    def check(self) -> None:
        if os.fstat(self.fd).st_size < self.end:
            raise ProtocolError(f"the host buffer holding this snapshot ({self.path}) was truncated by its "
                                "client", "bad_region")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def chunk(self, leaf: TensorLeaf, a: int, b: int) -> tuple[np.ndarray, Callable[[], None]]:
        """Bytes ``a:b`` of ``leaf``, copied out of the file; call the second item once they are
        no longer used (the chunk is written)."""
        if not self.copy:
            self.check()
            return leaf.data[a:b], _nothing
        out = self.scratch.take(b - a)
        try:
            self.read_into(out, leaf.data.ctypes.data - self.base + a)
        except BaseException:
            self.scratch.give(out)
            raise
        return out, lambda: self.scratch.give(out)

    def read_into(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        done = 0
        while done < view.nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ProtocolError(f"the host buffer holding this snapshot ({self.path}) was truncated by "
                                    "its client", "bad_region")
            done += n

    def sample(self, leaf: TensorLeaf, nbytes: int) -> TensorLeaf:
        """The first ``nbytes`` of ``leaf`` as a leaf of their own (what the codec choice samples)."""
        if not self.copy:
            self.check()
            return leaf
        data = np.empty(nbytes, np.uint8)
        self.read_into(data, leaf.data.ctypes.data - self.base)
        return TensorLeaf(leaf.key, leaf.kind, leaf.dtype, leaf.shape, data)


def _nothing() -> None:
    pass


def write_inline(path: Path, end: int, parts: list[tuple[int, np.ndarray, bytes]], foreign: bool) -> None:
    """Write each ``(offset, view of the buffer there, bytes)`` of a snapshot's inline tensors,
    unless the client cut the file short of ``end`` (then nothing is written: the snapshot fails at
    its first read). One open for all of them; a buffer of another uid is written with ``pwrite``
    (it cannot fault), one of the daemon's own uid through the mapping, as the flush reads it."""
    if not parts:
        return
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size < end:
            return
        for offset, view, data in parts:
            if not foreign:
                view[:] = np.frombuffer(data, np.uint8)
                continue
            out = memoryview(data)
            while out.nbytes:
                n = os.pwrite(fd, out, offset)
                out, offset = out[n:], offset + n
    finally:
        os.close(fd)
