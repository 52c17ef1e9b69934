"""How a snapshot's bytes reach the daemon (``Client``'s part: snapd.client.daemon): the state
planned (snapd.client.snapshot_plan), a host buffer leased and written where the daemon cannot copy
the bytes itself, the descriptors sent, and the snapshot tracked until the daemon holds its copy.
An emergency snapshot's waits end at its handler's deadline (client/preemption.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from snapd.client import snapshot_plan
from snapd.client.connection import Connection
from snapd.client.host_buffers import HostBuffers, can_inline, inline_bytes
from snapd.client.layout import LayoutCache
from snapd.client.pending import Pending
from snapd.errors import Busy, SnapdError, SnapshotError

log = logging.getLogger(__name__)


class HandOver:
    """The hand-over's methods of ``Client``, which makes the state they use."""

    _conn: Connection
    _planner: snapshot_plan.Planner
    _layouts: LayoutCache
    _buffers: HostBuffers
    _export_: Any
    _regions: list
    _uncopied: list[Pending]
    _on_gpu: list[Pending]
    _grace_s: float | None
    _until: float | None
    _welcome_cuda: Any

    def _track(self, pending: Pending) -> None:
        """Keep ``pending`` (and the tensors it holds alive) until the daemon has copied it."""
        if not pending.copied:
            waiting = self._on_gpu if pending.on_gpu else self._uncopied
            if pending not in waiting:
                waiting.append(pending)

    def _hand_over(self, state: Any, step: int, metrics: dict, emergency: bool) -> Pending:
        t0 = time.perf_counter()
        if self._on_gpu:  # forget copies known done (each holds its tensors alive until then)
            self._on_gpu = [p for p in self._on_gpu if not (p.done() or p.copied)]
        plan = self._planner.plan(state)  # (after those: a copy that failed changes how tensors go)
        self._wait_registered(self._left())  # a region being copied is not described again until copied
        streams = self._export.streams(plan.leads, plan.leaves, plan.sources) if plan.leads else {}
        head: dict[str, Any] = {"step": step, "metrics": metrics, "emergency": emergency}
        if emergency and self._grace_s is not None:  # (the scheduler's time left: client/preemption.py)
            head["grace_s"], self._grace_s = self._grace_s, None
        waited_s = 0.0
        try:
            plain = plan.plain
            if plan.staged or plain and not can_inline(plan.leaves, plain):
                # bytes to write first: lease a buffer, then describe them
                head["lease"], waited_s = self._write(plan, emergency)
                plain = []
            else:  # the daemon copies every byte (tiny CPU tensors come in the message): it leases the buffer
                head["nbytes"] = plan.nbytes
                if plain:  # Adam's step counters, say: CPU scalars beside a state on the GPU
                    head["inline"] = inline_bytes(plan.leaves, plain)
            if streams:
                head["ready_events"] = self._export.record(streams)
            fields = snapshot_plan.layout_fields(plan, plain, self._layouts)
            req = self._conn.send("snapshot", **head, **fields)
            try:  # "copied" (plain) or "received" (the daemon copies registered/GPU bytes)
                first = self._conn.wait(req, self._left())
            except SnapdError as e:
                if e.code != "unknown_layout":  # refused (the lease went back)
                    self._layouts.forget()
                    raise
                if plan.tree is None:  # a replayed plan has no tree: flatten this state after all
                    plan = self._planner.flatten(state)
                if "lease" in head:  # a refused snapshot's lease went back: write the bytes again
                    head["lease"], waited_s = self._write(plan, emergency)
                req = self._conn.send("snapshot", **head, **self._layouts.define(plan.tree, plan.scalars,
                                                                                  plan.signature(plain)))
                first = self._conn.wait(req, self._left())
            self._planner.taken(state, plan)
        except Busy as e:
            log.info("step %d skipped: %s", step, e)
            return Pending(self, step, None, stall_s=time.perf_counter() - t0, skipped=str(e))
        waited_s = max(waited_s, first.get("waited_s", 0.0))  # (a snapshot sent without a lease waited there)
        if waited_s > 0.05:
            log.info("step %d waited %.2f s for a free host buffer", step, waited_s)
        anchors = (self._export.next_seq(), [plan.sources[i] for i in plan.anchors]) if streams else None
        retry = (lambda: self._hand_over(state, step, metrics, emergency)) if streams else None
        return Pending(self, step, req, copied=first["type"] == "copied", stall_s=time.perf_counter() - t0,
                       waited_s=waited_s, streams=streams, anchors=anchors, retry=retry,
                       keep=plan.sources if streams else None)  # (the CPU ones too: no harm, no loop)

    def _device_copy_failed(self, e: SnapshotError) -> None:
        """The daemon could not copy a snapshot's device tensors (``Pending``): stage them here."""
        self._export.copy_failed(e.code, e.details, str(e))
        self._planner.forget()  # (the memo would replay the descriptors that failed)

    def _write(self, plan: snapshot_plan.SnapshotPlan, emergency: bool) -> tuple[int, float]:
        """Lease a host buffer and write into it what the daemon cannot copy itself: plain tensors
        and device tensors without IPC. Returns the lease and how long the grant took to come."""
        granted = self._conn.wait(self._conn.send("acquire", nbytes=plan.nbytes, emergency=emergency),
                                  self._left())
        try:
            buf = self._buffers.mapping(granted["path"], granted["bytes"], plan.nbytes)
            leaves, offsets = plan.leaves, plan.offsets
            self._buffers.copy(buf, [leaves[i] for i in plan.plain], [offsets[i] for i in plan.plain])
            for i in plan.staged:  # no IPC for these: copy them device -> host buffer here
                self._export.stage(leaves[i], buf[offsets[i]:offsets[i] + leaves[i].nbytes], buf)
        except BaseException:
            self._conn.send("release", lease=granted["lease"])
            raise
        return granted["lease"], granted["waited_s"]

    @property
    def _export(self) -> Any:
        if self._export_ is None:  # the GPU path's driver calls are loaded with the first device tensor
            from snapd.client.cuda_export import CudaExport

            self._export_ = CudaExport(self._welcome_cuda)
        return self._export_

    def _registered(self, leaf: Any) -> tuple[int, int] | None:
        for region in self._regions:
            off = region.offset_of(leaf.ptr, leaf.nbytes) if leaf.nbytes else None
            if off is not None:
                return region.id, off
        return None

    def _wait_registered(self, timeout: float | None = None) -> None:
        while self._uncopied:
            self._uncopied[0].wait_copied(timeout)
            self._uncopied.pop(0)

    def _left(self) -> float | None:
        """What is left of an emergency hand-over's time (client/preemption.py: its ``deadline_s``);
        None outside one. Its waits for a host buffer (all busy at the memory cap: the daemon would
        hold it up to busy_wait_s) are bounded by it, so that the handler still hands the signal on
        (and requeues) before the scheduler's kill."""
        return None if self._until is None else max(0.05, self._until - time.monotonic())
