"""The client's half of the GPU path: export device tensors to the daemon by CUDA IPC.

For each CUDA tensor (torch, CuPy, anything with ``__cuda_array_interface__``)
the daemon gets the IPC handle of the allocation holding it (allocators hand
out sub-blocks of large allocations, and a handle is per allocation; cached
here by the driver's allocation id) and the tensor's offset in it; devices
are named by UUID. Per device, an interprocess event is recorded on the
trainer's stream, so the daemon's copy starts after the work that produced
the values. ``snapshot()`` returns after that handshake: the CPU never waits
for the copy. Before the next mutation, ``fence`` makes the trainer's stream
wait on the daemon's "done" events: the GPU waits only if the copy is
unfinished, the CPU not at all.

The daemon keeps the handles of the allocations the latest snapshot used
open (reopening them every snapshot would cost a driver call each), and CUDA
leaves freeing memory that another process still maps undefined. So one tensor
of each such allocation is held here (``hold``) until the daemon has closed its
handle: the trainer's allocator cannot free (``empty_cache``, its garbage
collection) an allocation the daemon maps, and counts it as in use, as it is.

Where IPC cannot work the client copies device -> host buffer itself
(``stage``), logging once why: an allocation made by PyTorch's
``expandable_segments`` (not legacy-IPC capable), a daemon in another pid
namespace or without that device, or CUDA MPS; and, found only when tried,
an allocation whose handle the driver will not export here or open in the
daemon, or a daemon whose device copy failed (``copy_failed``).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import sys
from typing import Any

import numpy as np

from snapd import cuda_driver
from snapd.format.leaves import TensorLeaf

log = logging.getLogger(__name__)

EVENT_RING = 16  # ready events per device, reused in turn (more than snapshots in flight)


def devices_in_use() -> list[str]:
    """The UUID of the device this process's torch works on, once it has initialized CUDA (a hint in
    ``hello``: the daemon gets ready to copy from it meanwhile); [] else."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return []
        return [cuda_driver.device_uuid(torch.cuda.current_device())]
    except Exception:  # (a hint only: without it the daemon gets ready with the first snapshot)
        return []


def _mps() -> bool:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


class CudaExport:
    def __init__(self, daemon_cuda: dict | None) -> None:
        info = daemon_cuda or {}
        self.daemon_devices = set(info.get("devices", []))
        self.why_not: str | None = None
        if not self.daemon_devices:
            self.why_not = "the daemon has no CUDA path (no CuPy or no device there)"
        elif info.get("pid_ns") != cuda_driver.pid_namespace():
            self.why_not = "the daemon runs in another pid namespace (CUDA IPC needs the same one)"
        elif _mps():
            self.why_not = "CUDA MPS is running (its clients cannot share memory by IPC)"
        self._said: set[str] = set()
        self._handles: dict[int, str] = {}  # allocation id -> handle (hex)
        self._refused: set[int] = set()  # allocation ids whose handle the daemon could not open
        self._allocs: dict[int, cuda_driver.Allocation] = {}  # tensor address -> its allocation
        self._checked: set[int] = set()  # allocation ids found live during this snapshot
        self._ranges: list[tuple[int, int, int]] = []  # their (base, end, id), by base
        self._by_id: dict[int, cuda_driver.Allocation] = {}  # (of those)
        self._uuids: dict[int, str] = {}
        self._contexts: dict[str, int] = {}
        self._ready: dict[str, list[cuda_driver.IpcEvent]] = {}
        self._turn: dict[str, int] = {}
        self._done: dict[str, cuda_driver.OpenedEvent] = {}
        self._primaries: dict[int, int] = {}  # device ordinal -> its primary context (staging VMM memory)
        self._pinned: dict[int, int] = {}  # host buffer address -> the context that pinned it (0: not pinned)
        self._seq = 0  # GPU-path snapshots handed over, in order
        self._held: list[Any] = []  # a tensor of each allocation the daemon may still map (``hold``)
        self._held_seq = 0

    def _once(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.warning("GPU tensors staged by this process, not copied by the daemon: %s", reason)

    def describe_all(self, leaves: list[TensorLeaf]) -> dict[int, dict | None]:
        """The `cuda` descriptor of each device leaf (by index; None: this process stages it)."""
        self._checked.clear()  # allocations are checked again, once each, for every snapshot
        self._ranges.clear()
        self._by_id.clear()
        return {i: self.describe(leaf) for i, leaf in enumerate(leaves) if leaf.on_device and leaf.nbytes}

    def describe(self, leaf: TensorLeaf) -> dict | None:
        """The leaf's `cuda` descriptor, or None when this process must stage it."""
        if self.why_not:
            self._once(self.why_not)
            return None
        alloc = self._allocation(leaf.ptr)
        if not alloc.ipc_capable:
            self._once("the allocation is not legacy-IPC capable (PyTorch expandable_segments?)")
            return None
        if alloc.buffer_id in self._refused:
            self._once("the daemon could not open the CUDA IPC handle of an allocation")
            return None
        uuid = self._uuids.get(alloc.ordinal)
        if uuid is None:
            uuid = self._uuids[alloc.ordinal] = cuda_driver.device_uuid(alloc.ordinal)
        if uuid not in self.daemon_devices:
            self._once(f"the daemon cannot see device {uuid}")
            return None
        handle = self._handles.get(alloc.buffer_id)
        if handle is None:
            try:
                handle = self._handles[alloc.buffer_id] = cuda_driver.mem_handle(alloc).hex()
            except cuda_driver.CudaError as e:  # (memory the driver will not share: staged instead)
                self._refused.add(alloc.buffer_id)
                self._once(f"an allocation has no CUDA IPC handle here ({e})")
                return None
        self._contexts.setdefault(uuid, alloc.context)
        return {"dev": uuid, "handle": handle, "offset": leaf.ptr - alloc.base, "size": alloc.size}

    def copy_failed(self, code: str, details: dict, reason: str) -> None:
        """The daemon could not copy a snapshot from the device: stage from now on the allocations
        whose handles it could not open (``ipc_refused``; ones freed and made again get new handles,
        tried anew), or every device tensor when it opened none of this process's or its copy failed."""
        refused = set(details.get("refused") or ())
        if code == "ipc_refused" and refused and details.get("any_open"):
            self._refused.update(bid for bid, h in self._handles.items() if h in refused)
            log.warning("the daemon could not open %d CUDA IPC handle(s) of this process (%s): their "
                        "tensors are staged by this process from now on", len(refused), reason)
        elif self.why_not is None:
            self.why_not = f"the daemon could not copy them from the device ({reason})"

    def streams(self, leads: dict[str, int], leaves: list[TensorLeaf], sources: list[Any]) -> dict[str, int]:
        """The trainer stream of each device the snapshot copies from: that of ``leads[device]``,
        its first tensor there (asked once a device, not once a tensor: torch's current_stream
        costs microseconds). ``sources`` are the tensors behind ``leaves`` (a replayed snapshot's
        leaves have none)."""
        return {dev: _stream_of(leaves[i].kind, sources[i]) for dev, i in leads.items()}

    def allocations(self, ptrs: list[int]) -> list[tuple[int, int]]:
        """One (address, allocation id) per allocation holding these (described) addresses."""
        out: dict[int, int] = {}
        for ptr in ptrs:
            out.setdefault(self._allocation(ptr).buffer_id, ptr)  # (cached: checked in describe_all)
        return [(ptr, buffer_id) for buffer_id, ptr in out.items()]

    def still_live(self, allocations: list[tuple[int, int]]) -> bool:
        """Whether each allocation is still the one described (a replayed snapshot's check: one
        driver call per allocation, as ``describe_all`` makes)."""
        try:
            return all(cuda_driver.buffer_id(ptr) == buffer_id for ptr, buffer_id in allocations)
        except cuda_driver.CudaError:
            return False

    def _allocation(self, ptr: int) -> cuda_driver.Allocation:
        """Where ``ptr`` lives, cached by address and re-checked by allocation id: a freed and
        re-made allocation at the same address gets a new id, and a new handle. The check is one
        driver call (a few us through ctypes) per allocation per snapshot, not per tensor: ids are
        unique for the life of the process, so an id found live now still holds its whole range,
        and every address in it (allocators put many tensors in one allocation): an address not
        met before, inside an allocation found live in this snapshot, needs no driver call either
        (a full query is ~8 us through ctypes: 8 ms for a thousand new tensors)."""
        alloc = self._allocs.get(ptr)
        if alloc is not None and alloc.buffer_id in self._checked:
            return alloc
        inside = self._covering(ptr)
        if inside is not None:
            self._allocs[ptr] = inside
            return inside
        if alloc is None or cuda_driver.buffer_id(ptr) != alloc.buffer_id:
            if len(self._allocs) > 65536:  # tensors that come and go: keep the cache bounded
                self._allocs.clear()
            alloc = self._allocs[ptr] = cuda_driver.Allocation(ptr)
        self._checked.add(alloc.buffer_id)
        self._by_id[alloc.buffer_id] = alloc
        bisect.insort(self._ranges, (alloc.base, alloc.base + alloc.size, alloc.buffer_id))
        return alloc

    def _covering(self, ptr: int) -> cuda_driver.Allocation | None:
        """The allocation found live in this snapshot whose range holds ``ptr``, if any (live
        allocations do not overlap)."""
        i = bisect.bisect_right(self._ranges, (ptr, float("inf"), 0)) - 1
        if i >= 0 and ptr < self._ranges[i][1]:
            return self._by_id[self._ranges[i][2]]
        return None

    def record(self, streams: dict[str, int]) -> dict[str, str]:
        """Record a ready event on each device's trainer stream; their handles, for the daemon."""
        out = {}
        for uuid, stream in streams.items():
            ring = self._ready.setdefault(uuid, [])
            turn = self._turn.get(uuid, 0)
            self._turn[uuid] = turn + 1
            if len(ring) < EVENT_RING:
                ring.append(cuda_driver.IpcEvent(self._contexts[uuid]))
            ev = ring[turn % EVENT_RING]
            ev.record(stream)
            out[uuid] = ev.handle.hex()
        return out

    def fence(self, done_events: dict[str, str], streams: dict[str, int]) -> None:
        """Make the trainer's streams wait (on the GPU) for the daemon's copies."""
        for uuid, handle in done_events.items():
            ev = self._done.get(handle)
            if ev is None:
                ev = self._done[handle] = cuda_driver.OpenedEvent(self._contexts[uuid], bytes.fromhex(handle))
            ev.wait_on(streams[uuid])

    def stage(self, leaf: TensorLeaf, dst: np.ndarray, mapping: np.ndarray) -> None:
        """Copy a device tensor into the host buffer ourselves (blocking: this is the fallback).
        torch tensors by torch (its current stream orders the copy); anything else known by
        ``__cuda_array_interface__`` (CuPy, JAX, Numba, ...) by the driver, after the stream the
        interface names: no CuPy needed in the trainer."""
        src = leaf.source
        alloc = self._allocation(leaf.ptr)
        context = alloc.context or self._primary(alloc.ordinal)  # (VMM memory names none: the runtime's)
        self._pin(mapping, context)
        if leaf.kind == "torch":
            import torch

            torch.from_numpy(dst).copy_(src.detach().reshape(-1).view(torch.uint8))
        else:
            cuda_driver.copy_to_host(context, dst.ctypes.data, leaf.ptr, leaf.nbytes,
                                     _stream_of(leaf.kind, src))

    def _primary(self, ordinal: int) -> int:
        ctx = self._primaries.get(ordinal)
        if ctx is None:
            ctx = self._primaries[ordinal] = cuda_driver.primary_context(ordinal)
        return ctx

    def _pin(self, mapping: np.ndarray, context: int) -> None:
        """Page-lock the mapped host buffer once (portable: for every context), so staging copies
        run at full speed."""
        address = mapping.ctypes.data
        if address in self._pinned:
            return
        self._pinned[address] = context
        try:
            cuda_driver.host_register(context, address, mapping.nbytes)
        except cuda_driver.CudaError as e:
            self._pinned[address] = 0
            log.info("could not pin the host buffer (%s); staging copies are slower", e)

    def unpin(self, address: int) -> None:
        """The mapping at ``address`` is about to go (the daemon replaced that buffer): unpin it, or
        its pages stay locked for the life of the process."""
        context = self._pinned.pop(address, 0)
        if context:
            try:
                cuda_driver.host_unregister(context, address)
            except cuda_driver.CudaError as e:
                log.debug("unpinning the host buffer: %s", e)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def hold(self, seq: int, anchors: list[Any], ok: bool) -> None:
        """GPU-path snapshot ``seq`` (``next_seq``) is copied (``ok``) or failed; ``anchors``: a
        tensor of each allocation it used. Once copied, the daemon has closed the handles of the
        allocations it no longer uses and keeps these mapped: hold them instead of the earlier
        ones. A failed snapshot may have left anything open: hold its anchors besides. A message
        read after a later snapshot's changes nothing (the daemon copies in order)."""
        if seq < self._held_seq:
            return
        self._held = anchors if ok else [*self._held, *anchors]
        self._held_seq = seq

    def close(self) -> None:
        """(After ``bye``: the daemon has closed this client's handles.)"""
        self._held = []
        for ev in [*self._done.values(), *(e for ring in self._ready.values() for e in ring)]:
            with contextlib.suppress(cuda_driver.CudaError):  # (the context may already be gone at exit)
                ev.close()
        self._done.clear()
        self._ready.clear()


def _stream_of(kind: str, source: Any) -> int:
    """The stream the tensor's values are produced on: torch's current stream for its device, or
    the stream ``__cuda_array_interface__`` names (0: the legacy default stream)."""
    if kind == "torch":
        import torch

        return torch.cuda.current_stream(source.device).cuda_stream
    stream = source.__cuda_array_interface__.get("stream")
    return int(stream) if stream else 0
