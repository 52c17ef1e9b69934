"""Page-locking the daemon's host buffers for device->host copies (the GPU path).

A copy into pageable memory goes through the driver's own bounce buffer at a
fraction of the bus's speed, so every host buffer is registered with CUDA
(``cuMemHostRegister``, portable: for every device) before its first copy:
ahead of time on a thread of its own, or by the GPU thread for the buffer a
snapshot was given if that one is not done yet. Registering needs a CUDA
context, and the daemon makes one on a device only once a trainer that works
on it connects (``gpu_copy``): until then the buffers wait here. Pinning a
buffer takes seconds; it holds up only that buffer's copy. Its unmapping
never waits: a buffer dropped while being pinned is unpinned and unmapped by
the pinning thread when it is done (the server thread drops buffers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from snapd import cuda_driver
from snapd.daemon import gpu_windows

log = logging.getLogger(__name__)


class HostPins:
    def __init__(self) -> None:
        self._context: int | None = None  # the first device's, once one is in use
        self._waiting: list = []  # host buffers to pin once there is a context
        self._pinned: dict[int, list[int]] = {}  # host buffer address -> the pieces registered
        self._pinning: set[int] = set()  # addresses being pinned now (outside the lock: seconds each)
        self._dropped: dict[int, Callable[[], None]] = {}  # of those, dropped meanwhile: unmap when done
        self._cond = threading.Condition()  # guards the above; the pinning threads, the GPU thread, the pool

    def start(self, context: int) -> None:
        """A device is in use: pin with its context from now on, beginning with the buffers waiting."""
        with self._cond:
            if self._context is not None:
                return
            self._context, waiting, self._waiting = context, self._waiting, []
        self.ahead(waiting)

    def ahead(self, views: list) -> None:
        """Pin host buffers ahead of their first copy, on a thread of its own (about 1 GB/s with the
        first touch of the pages): a snapshot waits only for the buffer it was given."""
        with self._cond:
            if self._context is None:
                self._waiting.extend(views)
                return
        if views:
            threading.Thread(target=lambda: [self.now(v) for v in views], name="snapd-pin",
                             daemon=True).start()

    def now(self, host: Any) -> None:
        """Pin ``host`` (a buffer's view) unless it is already; if another thread is pinning it, wait
        for that (the caller is about to copy into it)."""
        address, size = host.ctypes.data, host.nbytes
        with self._cond:
            while address in self._pinning:
                self._cond.wait()
            if address in self._pinned or not size or self._context is None:
                return
            self._pinning.add(address)
            context = self._context
        pieces = []
        try:
            for a in range(0, size, gpu_windows.PIN_PIECE):
                cuda_driver.host_register(context, address + a, min(gpu_windows.PIN_PIECE, size - a))
                pieces.append(address + a)
            log.info("host buffer at %#x pinned for device copies (%d MiB)", address, size >> 20)
        except Exception as e:  # RLIMIT_MEMLOCK, or a kernel that refuses: copies still work, slower
            log.warning("cannot pin the host buffer (%s): device->host copies will be slower", e)
        finally:
            with self._cond:
                self._pinned[address] = pieces
                self._pinning.discard(address)
                unmap = self._dropped.pop(address, None)
                self._cond.notify_all()
            if unmap is not None:  # dropped while we pinned it: undo, then let it go
                self.drop(address, unmap)

    def drop(self, address: int, unmap: Callable[[], None] = lambda: None) -> None:
        """The host buffer at ``address`` leaves the pool (any thread; the pool's): unpin it, then
        call ``unmap``. Never waits: if it is being pinned, the pinning thread does both when done."""
        with self._cond:
            self._waiting = [v for v in self._waiting if v.ctypes.data != address]
            if address in self._pinning:
                self._dropped[address] = unmap
                return
            pieces = self._pinned.pop(address, [])
            context = self._context
        for piece in pieces:
            cuda_driver.host_unregister(context, piece)
        unmap()
