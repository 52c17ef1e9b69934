"""Reading a selection of a snapshot's tensors on a thread pool, a window at a time.

The wanted tensors are cut into windows of about ``WINDOW_BYTES``; the pool reads one window's
chunks while the caller hands on the one before (``done``): a restore onto a GPU uploads a window
and lets its host memory go, holding about two windows rather than the whole state. What a chunk
read checks and decodes is the reader's (``SnapshotReader.read_chunk``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from snapd.errors import FormatError
from snapd.format.manifest import Manifest, TensorRecord
from snapd.format.pools import started_pool

WINDOW_BYTES = 256 << 20  # tensors read before they are handed on (``read_tensors``'s ``done``)
# a selection smaller than this is read on the calling thread: a pool job costs ~10 us of handing
# over, more than reading a few KiB (a GPT's ~370 biases and norms: 5-15 ms a restore in a pool)
SERIAL_BYTES = 4 << 20


class ChunkReader(Protocol):
    """What is read from: a snapshot's reader (snapd.format.reader, snapd.remote.reader)."""

    path: Path
    manifest: Manifest

    def read_chunk(self, rec: TensorRecord, n: int, out: memoryview, keep_planes: bool = False) -> None: ...


def _physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _windows(wanted: list[int], sizes: list[int], window_bytes: int) -> list[list[int]]:
    """``wanted`` in order, cut into runs of at most ``window_bytes`` (a larger tensor alone)."""
    out: list[list[int]] = []
    size = 0
    for i, n in zip(wanted, sizes):
        if not out or (out[-1] and size + n > window_bytes):
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def _finish(window: list[int], futures: list, done: Callable[[int], None] | None) -> None:
    for fut in futures:
        fut.result()
    for i in window if done else ():
        done(i)


def read_tensors(reader: ChunkReader, wanted: list[int], buffer_for: Callable[[int], memoryview],
                 threads: int | None = None, keep_planes: Callable[[int], bool] = lambda i: False,
                 done: Callable[[int], None] | None = None, window_bytes: int | None = None) -> None:
    """Fill ``buffer_for(i)`` (a writable byte view of tensor i's size) for each wanted tensor;
    tensors for which ``keep_planes(i)`` keep their shuffled chunks as planes.

    ``done(i)``: called (on this thread) once tensor i is read, a window of about
    ``window_bytes`` of tensors at a time, while the threads read the next window: a restore
    onto a GPU uploads a window and lets its host memory go (about two windows held, not the
    whole state), and the uploads overlap the reads. ``buffer_for`` is asked per window."""
    limit = _physical_memory()
    total = sum(reader.manifest.tensors[i].nbytes for i in wanted)
    if total > limit:
        raise FormatError(f"{reader.path}: the selection declares {total} bytes, more than this "
                          f"machine's {limit} bytes of memory")
    chunks = sum(len(reader.manifest.tensors[i].chunks) for i in wanted)
    threads = min(threads or min(8, os.cpu_count() or 1), chunks)  # (all started: no more than jobs)
    if total < SERIAL_BYTES:
        threads = 1
    windows = _windows(wanted, [reader.manifest.tensors[i].nbytes for i in wanted],
                       window_bytes or WINDOW_BYTES)
    if threads <= 1:
        for window in windows:
            for job in _jobs(reader, window, buffer_for, keep_planes):
                reader.read_chunk(*job)
            _finish(window, [], done)
        return
    with started_pool(threads, "snapd-read") as pool:
        last: tuple[list[int], list] | None = None
        for window in windows:
            futures = [pool.submit(reader.read_chunk, *job)
                       for job in _jobs(reader, window, buffer_for, keep_planes)]
            if last is not None:
                _finish(*last, done)
            last = (window, futures)
        if last is not None:
            _finish(*last, done)


def _jobs(reader: ChunkReader, window: list[int], buffer_for: Callable[[int], memoryview],
          keep_planes: Callable[[int], bool]) -> list[tuple]:
    """``read_chunk``'s arguments for every chunk of the tensors in ``window``."""
    jobs = []
    for i in window:
        rec = reader.manifest.tensors[i]
        buf = buffer_for(i)
        keep = keep_planes(i)
        pos = 0
        for n, c in enumerate(rec.chunks):
            jobs.append((rec, n, buf[pos:pos + c.raw]) + ((True,) if keep else ()))
            pos += c.raw
    return jobs
