"""What the daemon opened for each client on the GPU path: memory handles, ready events, done events.

Memory handles are opened lazily, once per client and allocation, and kept open while that
client's snapshots use them (opening one maps the allocation: a driver call too slow for every
copy); ``GpuCopier`` closes those a snapshot no longer uses, and all of them when the client
leaves. A handle that will not open (a daemon whose driver or sandbox refuses CUDA IPC, an
allocation CUDA cannot share) is reported together with every other one of the snapshot that
would not: the client then copies those allocations into the host buffer itself, from that
snapshot on, instead of losing each snapshot that uses them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from snapd import cuda_driver

log = logging.getLogger(__name__)

EVENT_RING = 16  # done events per client and device, reused in turn (more than any client has in flight)


class HandlesRefused(Exception):
    """Some of a snapshot's IPC handles would not open here (``handles``, hex, as the client sent
    them); ``any_open``: whether any handle of that client is open (IPC works for it at all)."""

    def __init__(self, handles: list[str], first_error: str, any_open: bool) -> None:
        super().__init__(f"the daemon cannot open {len(handles)} of this trainer's CUDA IPC handle(s) "
                         f"({first_error})")
        self.handles, self.any_open = handles, any_open


class ClientHandles:
    """One client's memory handles, ready events (the trainer's) and done events (ours)."""

    def __init__(self) -> None:
        self.mem: dict[tuple[str, str], tuple[int, int]] = {}  # (device, handle) -> (context, base)
        self.ready: dict[str, cuda_driver.OpenedEvent] = {}
        self.done: dict[str, list[cuda_driver.IpcEvent]] = {}
        self.turn: dict[str, int] = defaultdict(int)

    def open(self, wanted: list[tuple[str, int, str]]) -> None:
        """Open the memory handles of ``wanted`` = [(device UUID, its context, handle hex)] not yet
        open; raises ``HandlesRefused`` naming each one that would not (the others stay open)."""
        refused: dict[str, str] = {}
        for uuid, context, handle in wanted:
            key = (uuid, handle)
            if key in self.mem or handle in refused:
                continue
            try:
                self.mem[key] = (context, cuda_driver.open_mem_handle(context, bytes.fromhex(handle)))
            except cuda_driver.CudaError as e:
                refused[handle] = str(e)
        if refused:
            raise HandlesRefused(list(refused), next(iter(refused.values())), bool(self.mem))

    def ready_event(self, context: int, handle: str) -> cuda_driver.OpenedEvent:
        ev = self.ready.get(handle)
        if ev is None:
            ev = self.ready[handle] = cuda_driver.OpenedEvent(context, bytes.fromhex(handle))
        return ev

    def done_event(self, uuid: str, context: int) -> cuda_driver.IpcEvent:
        ring = self.done.setdefault(uuid, [])
        turn = self.turn[uuid]
        self.turn[uuid] = turn + 1
        if len(ring) < EVENT_RING:
            ring.append(cuda_driver.IpcEvent(context))
            return ring[-1]
        return ring[turn % EVENT_RING]

    def close(self) -> None:
        """Close everything (the caller has made sure no copy still reads the client's memory)."""
        for context, base in self.mem.values():
            quietly(cuda_driver.close_mem_handle, context, base)
        for ev in self.ready.values():
            quietly(ev.close)
        for ring in self.done.values():
            for ev in ring:
                quietly(ev.close)


def failure(e: Exception) -> dict[str, Any]:
    """The ``done`` event's fields for a GPU copy that failed with ``e``: code ``ipc_refused`` (with
    the handles, so the client stages just those allocations, or everything when none of its
    handles opens) or ``copy`` (the device path failed: the client stages from then on)."""
    if isinstance(e, HandlesRefused):
        return {"code": "ipc_refused", "message": f"GPU copy: {e}", "refused": e.handles,
                "any_open": e.any_open}
    return {"code": "copy", "message": f"GPU copy: {e}"}


def quietly(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # closing: the client may be gone, its context with it
        log.debug("ignored while closing: %s", e)
