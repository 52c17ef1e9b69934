"""Faulting a host buffer's pages in before any client writes to it.

A page of shared memory is allocated and zeroed by the kernel on its first touch, and charged to
the cgroup of whoever touches it: the daemon touches its buffers itself, so that they count as
its memory and not a trainer's, and so that a snapshot's copy does not run at first-touch speed
(~1.3 GB/s here, against ~8.5 GB/s into touched pages).

A buffer made for a request waiting on it is touched on a few threads at once. One made ahead of
need is touched by one thread at the lowest CPU priority, so that it does not slow a trainer
restoring beside it; if a request comes to wait for it, ``hurry`` adds threads at the normal
priority for the pages still untouched. The work is cut in pieces that any of those threads
takes, the next free one first.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import mmap
import threading

import numpy as np

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
PIECE = 64 << 20  # the pages one thread takes at a time
MADV_POPULATE_WRITE = 23  # Linux 5.14 (Python's mmap module names it from 3.12 on)


def populate(view: np.ndarray) -> None:
    """Fault a mapping's pages in, writable, leaving its bytes as they are. madvise through
    ctypes: it releases the GIL for the seconds a large buffer takes (mmap.madvise does not)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.nbytes),
                        MADV_POPULATE_WRITE) == 0:
            return
    except (OSError, AttributeError):
        pass
    # older kernels: a read of each page faults it in (the first write later takes a minor fault)
    np.bitwise_or.reduce(view[::PAGE])


class Prefault:
    """The pages of one buffer being faulted in, in pieces, by whichever threads ``work``."""

    def __init__(self, view: np.ndarray) -> None:
        self._pieces = collections.deque(view[a:a + PIECE] for a in range(0, view.nbytes, PIECE))
        self._left = len(self._pieces)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        if not self._left:
            self._done.set()

    def work(self) -> None:
        """Fault pieces in until none is left (any thread, any number of them)."""
        while True:
            with self._lock:
                if not self._pieces:
                    return
                piece = self._pieces.popleft()
            try:
                populate(piece)
            except BaseException as e:  # (kept for ``wait``'s caller, which discards the buffer)
                self._error = self._error or e
            with self._lock:
                self._left -= 1
                if not self._left:
                    self._done.set()

    def start(self, threads: int, name: str) -> None:
        """``threads`` more threads working on it, at the calling thread's priority."""
        for i in range(threads):
            threading.Thread(target=self.work, name=f"{name}-{i}", daemon=True).start()

    def untouched(self) -> int:
        with self._lock:
            return len(self._pieces)

    def wait(self) -> None:
        """Until every piece is in; raises what a piece raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
