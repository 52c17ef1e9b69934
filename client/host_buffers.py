"""The client's side of the daemon's host buffers: mapping them, copying tensor bytes in, and the
tiny tensors whose bytes travel in the snapshot message instead.

The plain path copies each tensor from its own address (one memcpy per byte; no NumPy view of a
torch tensor, which costs ~15 us to make), large states on a few threads: ctypes releases the GIL
around memmove. Tiny CPU tensors (Adam's step counters beside a state on the GPU) travel inline,
so a snapshot the daemon otherwise copies entirely still needs no ``acquire``.
"""

from __future__ import annotations

import base64
import ctypes
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from snapd.errors import SnapdError
from snapd.format.leaves import TensorLeaf
from snapd.protocol import MAX_INLINE_TENSOR_BYTES

PARALLEL_COPY_BYTES = 64 << 20
MADV_POPULATE_READ = 22  # Linux 5.14; on shared memory it maps the pages writable, as MAP_POPULATE does
INLINE_TOTAL_BYTES = 64 << 10  # tiny CPU tensors up to this in all travel in the message (no acquire)


def can_inline(leaves: list[TensorLeaf], plain: list[int]) -> bool:
    """Whether the plain leaves ``plain`` (indices) are few and small enough to travel inline."""
    return sum(leaves[i].nbytes for i in plain) <= INLINE_TOTAL_BYTES \
        and all(leaves[i].nbytes <= MAX_INLINE_TENSOR_BYTES for i in plain)


def inline_bytes(leaves: list[TensorLeaf], plain: list[int]) -> str:
    """The ``inline`` field: those leaves' bytes, in order, base64."""
    return base64.b64encode(b"".join(ctypes.string_at(leaves[i].ptr,
                                                      leaves[i].nbytes) for i in plain)).decode()


class HostBuffers:
    def __init__(self, on_drop: Callable[[int], None]) -> None:
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        self._faulted: dict[str, int] = {}  # how far into each mapping its pages are mapped
        self._libc: ctypes.CDLL | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._on_drop = on_drop  # told the address of a mapping about to go (the GPU fallback unpins it)

    def mapping(self, path: str, nbytes: int, used: int = 0) -> np.ndarray:
        """The mapping of a host buffer, its first ``used`` bytes' pages mapped in. The daemon
        replaces a buffer's file when it grows or passes between users, so mappings are kept by
        path; one to a replaced file is dropped."""
        if path not in self._maps:
            for stale in [p for p in self._maps if not os.path.exists(p)]:
                mm, view = self._maps.pop(stale)
                self._faulted.pop(stale, None)
                self._on_drop(view.ctypes.data)
            fd = os.open(path, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._maps[path] = (mm, np.frombuffer(mm, dtype=np.uint8))
        view = self._maps[path][1]
        self._fault_in(path, view, min(used, view.size))
        return view

    def _fault_in(self, path: str, view: np.ndarray, end: int) -> None:
        """Map the pages of ``view[:end]`` not yet mapped, in one call: the daemon has touched them
        already, but this process's first copy into them faulted page by page, 0.38 s a GiB
        against 0.06 s for the madvise and 0.08 s for the copy after it (measured here)."""
        start = self._faulted.get(path, 0)
        if end <= start:
            return
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        a, b = start // page * page, -(-end // page) * page
        # (an older kernel says EINVAL: the copy faults the pages in, as before)
        self._libc.madvise(ctypes.c_void_p(view.ctypes.data + a), ctypes.c_size_t(min(b, view.size) - a),
                           MADV_POPULATE_READ)
        self._faulted[path] = end

    def copy(self, buf: np.ndarray, leaves: list[TensorLeaf], offsets: list[int]) -> None:
        """Each leaf's bytes to its offset in ``buf``."""
        base, jobs = buf.ctypes.data, []
        for leaf, off in zip(leaves, offsets):
            n = leaf.nbytes
            if off + n > buf.size:  # the daemon grants what was asked; a raw copy must never run past it
                raise SnapdError(f"{leaf.key}: {n} bytes at {off} do not fit the {buf.size}-byte host buffer")
            for a in range(0, n, PARALLEL_COPY_BYTES):
                jobs.append((base + off + a, leaf.ptr + a, min(PARALLEL_COPY_BYTES, n - a)))
        if sum(job[2] for job in jobs) < 2 * PARALLEL_COPY_BYTES:
            for job in jobs:
                ctypes.memmove(*job)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="snapd-copy")
        list(self._pool.map(lambda job: ctypes.memmove(*job), jobs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._maps.clear()  # (a mapping goes when the last view of it does)
        self._faulted.clear()
