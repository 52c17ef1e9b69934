"""Page-locking the daemon's host buffers for device->host copies (the GPU path).

A copy into pageable memory goes through the driver's own bounce buffer at a
fraction of the bus's speed, so every host buffer is registered with CUDA
(``cuMemHostRegister``, portable: for every device) before its first copy:
ahead of time on a thread of its own, or by the GPU thread for the buffer a
snapshot was given if that one is not done yet. Registering needs a CUDA
context, and the daemon makes none until a snapshot copies from a device
(``gpu_copy``): until then the buffers wait here.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from snapd import cuda_driver
from snapd.daemon import gpu_windows

log = logging.getLogger(__name__)


class HostPins:
    def __init__(self) -> None:
        self._context: int | None = None  # the first device's, once one is in use
        self._waiting: list = []  # host buffers to pin once there is a context
        self._pinned: dict[int, list[int]] = {}  # host buffer address -> the pieces registered
        self._lock = threading.Lock()  # the pinning threads, the GPU thread, the pool's unpin

    def start(self, context: int) -> None:
        """A device is in use: pin with its context from now on, beginning with the buffers waiting."""
        with self._lock:
            if self._context is not None:
                return
            self._context, waiting, self._waiting = context, self._waiting, []
        self.ahead(waiting)

    def ahead(self, views: list) -> None:
        """Pin host buffers ahead of their first copy, on a thread of its own (about 1 GB/s with the
        first touch of the pages): a snapshot waits only for the buffer it was given."""
        with self._lock:
            if self._context is None:
                self._waiting.extend(views)
                return
        if views:
            threading.Thread(target=lambda: [self.now(v) for v in views], name="snapd-pin", daemon=True).start()

    def now(self, host: Any) -> None:
        """Pin ``host`` (a buffer's view) unless it is already (the caller made sure of a context)."""
        address, size = host.ctypes.data, host.nbytes
        with self._lock:  # each buffer once
            if address in self._pinned or not size or self._context is None:
                return
            pieces = []
            try:
                for a in range(0, size, gpu_windows.PIN_PIECE):
                    cuda_driver.host_register(self._context, address + a, min(gpu_windows.PIN_PIECE, size - a))
                    pieces.append(address + a)
                log.info("host buffer at %#x pinned for device copies (%d MiB)", address, size >> 20)
            except Exception as e:  # RLIMIT_MEMLOCK, or a kernel that refuses: copies still work, slower
                log.warning("cannot pin the host buffer (%s): device->host copies will be slower", e)
            self._pinned[address] = pieces

    def drop(self, address: int) -> None:
        """The host buffer at ``address`` is about to be unmapped (called by the pool, any thread)."""
        with self._lock:
            self._waiting = [v for v in self._waiting if v.ctypes.data != address]
            for piece in self._pinned.pop(address, []):
                cuda_driver.host_unregister(self._context, piece)
