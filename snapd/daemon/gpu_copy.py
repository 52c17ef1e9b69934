"""The daemon's GPU copy stage: client device memory -> pinned host buffer.

A snapshot whose tensors live on a GPU arrives as CUDA IPC handles (one per
allocation, plus the tensor's offset in it) and, per device, an
interprocess event the trainer recorded after the work that produced the
values. On the ``snapd-gpu`` thread, for each device, on that device's one
copy stream:
  wait for the trainer's event -> per window (``gpu_windows.plan``): pack
  (and, when the job's codec shuffles, shuffle each writer chunk) into the
  device staging buffer with one kernel launch, then copy it to the leased
  host buffer (page-locked) -> record a "done" interprocess event.
The events' handles go to the client at once (``queued``): its next
mutation waits on them on the GPU, never on the CPU. A second thread waits
for the copies on the host, then reports ``copied`` and hands the snapshot
to the encode/flush stages, which read the host buffer as on the CPU path.

A device gets the daemon's context, copy stream and staging window when a
trainer that works on it connects (``hello``'s ``cuda_devices``: ``prepare``),
or at the latest with the first snapshot that copies from it: a daemon no
trainer uses on a GPU holds no memory there, and one that cannot have them (the
trainer filled the device's memory) fails that snapshot, which the client then
stages. A device in exclusive-process or prohibited compute mode is never used
(a context of ours would lock the trainers out): its tensors are staged.

Handles are opened lazily and cached per client and allocation
(``gpu_handles``); those a client's latest snapshot did not use are closed
after it, and all of a client's are closed when it leaves. A copy that fails
(a handle that will not open, the device path broken) fails that snapshot
with a code that tells the client to copy those tensors itself from then on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import zmq

from snapd import cuda_driver
from snapd.daemon import gpu_windows
from snapd.daemon.channels import Outbox, stage_loop
from snapd.daemon.gpu_handles import ClientHandles, failure, quietly
from snapd.daemon.gpu_work import Close, Copy, Device, Forget, Prepare, Wait
from snapd.daemon.host_pinning import HostPins
from snapd.daemon.regions import copy_from_region

log = logging.getLogger(__name__)

_D2H = 2  # cudaMemcpyDeviceToHost


class GpuCopier:
    def __init__(self, ctx: zmq.Context, chunk_bytes: int, failed: Callable[..., dict]) -> None:
        """``failed(task, stage, code, message, **extra)``: the pipeline's (it fails the task and
        makes the "done" event)."""
        import cupy

        self._cp = cupy
        self._ctx, self._failed = ctx, failed
        self.chunk_bytes = chunk_bytes
        self._ordinals: dict[str, int] = {}  # the devices this daemon may copy from: UUID -> ordinal
        self.skipped: dict[str, str] = {}  # the others: UUID -> why
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            uuid, mode = cuda_driver.device_uuid(i), cuda_driver.compute_mode(i)
            if mode == cuda_driver.COMPUTE_MODE_DEFAULT:
                self._ordinals[uuid] = i
            else:
                self.skipped[uuid] = f"{cuda_driver.COMPUTE_MODES.get(mode, mode)} compute mode"
                log.warning("GPU path: device %s is in %s: its tensors are staged by the trainers", uuid,
                            self.skipped[uuid])
        if not self._ordinals:
            raise RuntimeError("no device in the default compute mode (a context of the daemon's would lock "
                               "the trainers out of an exclusive one)")
        self.devices: dict[str, Device] = {}  # made on the GPU thread (``_device``), the GPU thread's only
        self._in_use: tuple[str, ...] = ()  # their UUIDs, for other threads (replaced whole, never changed)
        self._pins = HostPins()
        log.info("GPU path: CUDA IPC from devices %s", ", ".join(self.describe()))
        self._clients: dict[bytes, ClientHandles] = {}
        self._work: queue.Queue = queue.Queue()
        self._waits: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=stage_loop, name="snapd-gpu", daemon=True,
                             args=(ctx, "GPU copy", self._work.get, self._handle, self._handle_failed)),
            threading.Thread(target=stage_loop, name="snapd-gpu-wait", daemon=True,
                             args=(ctx, "GPU wait", self._waits.get, self._wait_one, self._wait_failed))]

    def describe(self) -> list[str]:
        """The UUIDs of the devices this daemon copies from (sent to clients in ``welcome``)."""
        return sorted(self._ordinals)

    def in_use(self) -> list[str]:
        """The devices where the daemon has its context and staging window (any thread)."""
        return sorted(self._in_use)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._work.put(None)
        self._threads[0].join(timeout=5)
        self._waits.put(None)  # (after the GPU thread: it may still queue waits)

    def copy(self, task: Any, items: list[tuple[Any, dict]], ready: dict[str, str], host: Any,
             shuffle: bool, region_copies: list, plans: dict | None = None) -> None:
        """Queue ``items`` = [(leaf over the host buffer, its `cuda` descriptor)] of ``task``, and the
        registered-region copies of the same snapshot, if any. ``plans``: where the device plans
        made for these descriptors are kept for the next snapshot of the same layout (the layout's
        own dict, so that they go with it)."""
        self._work.put(Copy(task, items, ready, host, shuffle, region_copies, plans))

    def prepare(self, uuids: list[str]) -> None:
        """A trainer that works on these devices connected: make what a copy from them needs now, on
        the GPU thread, so that its first snapshot does not wait for it (``_device``)."""
        for uuid in uuids:
            if uuid in self._ordinals and uuid not in self.devices:
                self._work.put(Prepare(uuid))

    def pin(self, views: list) -> None:
        """Page-lock host buffers ahead of their first copy (``host_pinning``; once a device is in use)."""
        self._pins.ahead(views)

    def forget(self, peer: bytes, bye: int | None = None) -> None:
        """The client left: close what it opened (on the GPU thread, after its copies). ``bye``:
        the id of its ``bye``, answered once that is done (the client then lets go of the memory
        it held for us)."""
        self._work.put(Forget(peer, bye))

    def unpin(self, address: int, unmap: Callable[[], None]) -> None:
        """A host buffer leaves the pool (any thread): unpinned, then ``unmap`` (never waits)."""
        self._pins.drop(address, unmap)

    # -- the GPU thread ------------------------------------------------------------
    def _handle(self, item: Copy | Prepare | Forget, outbox: Outbox) -> None:
        if isinstance(item, Prepare):
            try:
                self._device(item.uuid)
            except Exception as e:  # (the first snapshot from it tries again, and fails over)
                log.warning("GPU path: %s", e)
        elif isinstance(item, Forget):
            self._close(item.peer)
            if item.bye is not None:
                outbox.send({"event": "forgotten", "peer": item.peer.hex(), "id": item.bye})
        else:
            for dst, src in item.region_copies:
                copy_from_region(dst, src)
            handles, marks = self._enqueue(item.task, item.items, item.ready, item.host, item.shuffle,
                                           item.plans)
            outbox.send({"event": "queued", "seq": item.task.seq, "events": handles})
            self._waits.put(Wait(item.task, marks, None))

    def _handle_failed(self, item: Copy | Prepare | Forget, error: Exception, outbox: Outbox) -> None:
        """A copy that failed (a handle that will not open, a device gone) fails its snapshot; a
        leaving client's ``bye`` is answered whatever became of its handles."""
        if isinstance(item, Copy):
            self._quiesce()  # nothing may still read the client's memory
            self._waits.put(Wait(item.task, None, failure(error)))
            return
        log.error("GPU path: %s failed: %s: %s", type(item).__name__.lower(),
                  type(error).__name__, error)
        if isinstance(item, Forget) and item.bye is not None:
            outbox.send({"event": "forgotten", "peer": item.peer.hex(), "id": item.bye})

    def _quiesce(self) -> None:
        for d in list(self.devices.values()):
            try:
                d.stream.synchronize()
            except Exception as e:  # (a device in error: nothing more of ours runs there)
                log.error("GPU path: device %s: synchronize failed: %s", d.uuid, e)

    def _enqueue(self, task: Any, items: list, ready: dict[str, str], host: Any, shuffle: bool,
                 plans: dict | None) -> tuple[dict[str, str], list]:
        from snapd.kernels.cupy_backend import run_launches

        cp = self._cp
        client = self._clients.setdefault(task.peer, ClientHandles())
        by_dev = plans.get(shuffle) if plans is not None else None
        # (a kept plan names them)
        for uuid in by_dev if by_dev is not None else {d["dev"] for _, d in items}:
            self._device(uuid)
        self._pins.now(host)
        if by_dev is None or any(client.mem.get(key, (0, None))[1] != base
                                 for p in by_dev.values() for key, base in p.bases.items()):
            by_dev = self._plan(client, items, host.ctypes.data, shuffle)  # (a new layout, or a handle moved)
            if plans is not None:
                plans[shuffle] = by_dev
        for leaf, _ in items:
            leaf.preshuffled = shuffle
        used = {key for p in by_dev.values() for key in p.bases}
        handles, marks = {}, []
        address = host.ctypes.data
        for uuid, p in by_dev.items():
            dev = self.devices[uuid]
            stage = dev.staging.data.ptr
            with cp.cuda.Device(dev.ordinal):
                if uuid in ready:
                    client.ready_event(dev.context, ready[uuid]).wait_on(dev.stream.ptr)
                for prepared, copies in p.steps:
                    run_launches(prepared, dev.stream)
                    for at, rel, n in copies:
                        cp.cuda.runtime.memcpyAsync(address + at, stage + rel, n, _D2H, dev.stream.ptr)
                done = client.done_event(uuid, dev.context)
                done.record(dev.stream.ptr)
                handles[uuid] = done.handle.hex()
                mark = cp.cuda.Event(block=True, disable_timing=True)
                mark.record(dev.stream)
                marks.append(mark)
        for key in [k for k in client.mem if k not in used]:  # allocations the trainer no longer uses
            context, base = client.mem.pop(key)
            self._waits.put(Close(context, base, marks))
        return handles, marks

    def _plan(self, client: ClientHandles, items: list, host: int,
              shuffle: bool) -> dict[str, gpu_windows.DevicePlan]:
        """Each device's plan for ``items``, opening the handles not yet open (lazily: once per
        client and allocation). Host offsets are taken from the leaves over the host buffer at
        ``host``; the plans hold them relative to it."""
        from snapd.format.dtypes import ITEMSIZE

        client.open([(d["dev"], self.devices[d["dev"]].context, d["handle"]) for _, d in items])
        by_dev: dict[str, list] = defaultdict(list)
        for leaf, desc in items:
            by_dev[desc["dev"]].append((leaf, desc))
        out = {}
        for uuid, group in by_dev.items():
            dev = self.devices[uuid]
            bases: dict[tuple[str, str], int] = {}
            tensors = []
            for leaf, desc in group:
                key = (uuid, desc["handle"])
                base = bases[key] = client.mem[key][1]
                tensors.append((base + desc["offset"], leaf.data.ctypes.data - host, leaf.nbytes,
                                ITEMSIZE[leaf.dtype]))
            out[uuid] = gpu_windows.device_plan(tensors, bases, dev.staging.data.ptr, shuffle,
                                                self.chunk_bytes)
            log.info("GPU copy plan: %d tensors from %s in %d window(s), kept for the layout's next "
                     "snapshots", len(tensors), uuid, len(out[uuid].steps))
        return out

    def _device(self, uuid: str) -> Device:
        """The device's context, stream and staging window, made now if not yet
        (raises if they cannot be: the snapshot fails, and its client stages it)."""
        dev = self.devices.get(uuid)
        if dev is not None:
            return dev
        if uuid not in self._ordinals:
            raise RuntimeError(f"device {uuid} is not one this daemon copies from")
        try:
            dev = self.devices[uuid] = Device(self._cp, self._ordinals[uuid], uuid)
        except Exception as e:
            raise RuntimeError(f"device {uuid}: the daemon cannot have its context and staging window "
                               f"({gpu_windows.STAGING_BYTES / 2**20:g} MiB) there ({type(e).__name__}: "
                               f"{e})") from None
        self._in_use = (*self._in_use, uuid)
        log.info("GPU path: device %s in use (the daemon's context and staging window, %g MiB, there)", uuid,
                 gpu_windows.STAGING_BYTES / 2**20)
        self._pins.start(dev.context)
        return dev

    def _close(self, peer: bytes) -> None:
        client = self._clients.pop(peer, None)
        if client is None:
            return
        self._quiesce()
        client.close()

    # -- the waiting thread --------------------------------------------------------
    def _wait_one(self, item: Wait | Close, outbox: Outbox) -> None:
        if isinstance(item, Close):  # a handle no snapshot uses any more, once the copies are done
            for m in item.marks:
                m.synchronize()
            quietly(cuda_driver.close_mem_handle, item.context, item.base)
            return
        if item.error is not None:
            outbox.send(self._failed(item.task, "copy", **item.error))
            return
        for m in item.marks:
            m.synchronize()
        outbox.send({"event": "copied", "seq": item.task.seq, "from_gpu": True})

    def _wait_failed(self, item: Wait | Close, error: Exception, outbox: Outbox) -> None:
        if isinstance(item, Close):
            log.error("GPU path: closing a handle failed: %s: %s", type(error).__name__, error)
            return
        outbox.send(self._failed(item.task, "copy", **failure(error)))
