"""Accepting snapshots (server thread): a host buffer for each, within the limits and the user's
quota, and a ``snapshot`` message checked and made into a task, handed to its first stage once
its reply is out (``Handoff``).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapd import protocol
from snapd.daemon.buffer_reads import write_inline
from snapd.daemon.buffers import BufferPool, owner_uid
from snapd.daemon.config import DaemonConfig
from snapd.daemon.layouts import Layout, NewValues, Placement, layout_of, with_values
from snapd.daemon.leases import Leases
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.quotas import Quotas
from snapd.daemon.sessions import Session
from snapd.daemon.status import Tally
from snapd.daemon.tasks import HostSpan, Task, TaskTable
from snapd.errors import Busy, ProtocolError, ShuttingDown, SnapdError
from snapd.format.manifest_checks import check_tree
from snapd.format.saving import check_metrics


@dataclass
class Handoff:
    """An accepted snapshot's hand-over to its first stage, run after its reply is sent."""

    task: Task
    run: Callable[[], None]


class Intake:
    def __init__(self, config: DaemonConfig, pool: BufferPool, leases: Leases, quotas: Quotas,
                 tasks: TaskTable, pipeline: Pipeline, tally: Tally) -> None:
        self.config, self.pool, self.leases, self.quotas = config, pool, leases, quotas
        self.tasks, self.pipeline, self.tally = tasks, pipeline, tally
        self.gpu: Any = None  # snapd.daemon.gpu_copy.GpuCopier on the GPU path
        self.stopping = False

    def acquire(self, s: Session, req_id: int, nbytes: int, emergency: bool, then: Any = None) -> Any:
        """A host buffer for a snapshot of ``nbytes`` (snapd.daemon.leases), within the user's quota."""
        if self.stopping:  # (an emergency snapshot is taken still: the job is stopped with the daemon)
            s.heard_in_drain = True
            if not emergency:
                raise ShuttingDown("the daemon is shutting down and accepts only emergency snapshots")
        cap = self.config.buffer_cap
        if nbytes > cap:  # (max_host_buffer_bytes is at most max_host_memory_bytes: one names both)
            raise ProtocolError(f"a snapshot of {nbytes} bytes is over the largest host buffer this daemon "
                                f"makes, {cap} bytes: raise max_host_buffer_bytes (and the memory the daemon "
                                "may use)", "too_large")
        self.quotas.check(s, nbytes, self.tasks.pending_bytes(s.jobs_root))  # before a byte is copied
        try:
            return self.leases.acquire(s, req_id, nbytes, emergency, then)
        except Busy:
            self.tally.skipped()
            raise

    def accept(self, s: Session, msg: dict) -> tuple[bytes | None, Handoff | None]:
        """Check a ``snapshot`` message and make its task: the reply, and the hand-over to the task's
        stage. With a ``lease``, the buffer it names; with ``nbytes`` instead (every tensor is copied
        by the daemon: nothing to write first), a buffer leased here, now or once one frees (the
        reply is None until then). Refused, whatever the reason, the lease goes back (the server)."""
        if msg.get("lease") is None:
            layout, values = layout_of(s.layout, msg)
            if msg.get("nbytes") is None:
                raise ProtocolError("a snapshot needs a lease, or nbytes when the daemon copies every tensor",
                                    "bad_field")
            plan = self._check(s, layout, self.config.buffer_cap)
            if plan.has_plain:
                raise ProtocolError("tensors whose bytes the client copies into the buffer need a lease: "
                                    "acquire one first", "bad_field")
            metrics = check_metrics(msg["metrics"])
            blob = _inline_bytes(plan, msg.get("inline"))

            def then(lease: int, waited_s: float) -> tuple[bytes, Handoff]:
                return self._accepted(s, msg, layout, values, metrics, blob, lease, waited_s)
            # (a buffer that holds the tensors as placed, whatever ``nbytes`` says)
            nbytes = max(msg["nbytes"], plan.end)
            return self.acquire(s, msg["id"], nbytes, msg["emergency"], then) or (None, None)
        buf = self.leases.take(s, msg["lease"])
        s.heard_in_drain = s.heard_in_drain or self.stopping
        layout, values = layout_of(s.layout, msg)
        plan = self._check(s, layout, buf.view.size)
        plan.check_fits(buf.view)
        metrics = check_metrics(msg["metrics"])
        blob = _inline_bytes(plan, msg.get("inline"))
        return self._accepted(s, msg, layout, values, metrics, blob, msg["lease"], 0.0)

    def _check(self, s: Session, layout: Layout, buf_size: int) -> Placement:
        """The layout's placement, made and its tree checked the first time it is used."""
        if layout.plan is None:
            devices = set(self.gpu.describe()) if self.gpu is not None else set()
            layout.plan = Placement(layout.tensors, buf_size, s.regions, devices)
            try:
                check_tree(layout.tree, len(layout.plan.rows))
            except SnapdError as e:
                layout.plan = None
                raise ProtocolError(f"tree: {e}", "bad_field") from None
        return layout.plan

    def _accepted(self, s: Session, msg: dict, layout: Layout, values: NewValues | None, metrics: dict,
                  blob: bytes, lease: int, waited_s: float) -> tuple[bytes, Handoff]:
        plan, buf = layout.plan, self.pool.by_lease(lease)
        if layout.number is not None:
            s.layout = layout
        s.last_snapshot = {"step": msg["step"], "tensors": len(plan.rows), "bytes": plan.by_path}
        s.leases.discard(lease)  # the task owns the lease now
        task = Task(s.peer, msg["id"], s.job, msg["step"], metrics, msg["emergency"], layout.tree, [], lease,
                    s.retention, plan.raw_bytes, s.jobs_root,
                    buffer=HostSpan(buf.path, plan.end, buf.view.ctypes.data,
                                    owner_uid(buf.uid) != os.geteuid()),
                    rank=s.rank, world_size=s.world_size, per_rank=s.per_rank, run=s.run,
                    replicas=s.replicas, grace_s=msg.get("grace_s"))
        self.tasks.add(task)
        shuffle = plan.has_gpu and self.pipeline.gpu_shuffle(task) is not None
        in_buffer = not plan.has_gpu and not plan.has_copies  # plain path: the client copied the bytes first
        self.pipeline.received(task, in_buffer)
        if in_buffer:
            self.leases.copied(task.lease)
        ready_events = msg.get("ready_events") or {}

        def start() -> None:
            # After the reply: place the leaves and fill in the new values (~1.5 us a tensor that the
            # trainer need not wait for).
            task.leaves, copies, on_gpu = plan.place(buf.view)
            parts, pos, base = [], 0, buf.view.ctypes.data
            for i in plan.inline:  # before any stage reads the buffer (snapd.daemon.buffer_reads)
                leaf = task.leaves[i]
                parts.append((leaf.data.ctypes.data - base, leaf.data, blob[pos:pos + leaf.nbytes]))
                pos += leaf.nbytes
            write_inline(buf.path, plan.end, parts, task.buffer.foreign)
            if values is not None:
                task.tree = with_values(task.tree, iter(values.nodes(layout)))
            if on_gpu:  # GPU path: the copier reports queued, then copied
                self.gpu.copy(task, on_gpu, ready_events, buf.view, shuffle, copies, plan.gpu_plans)
            elif copies:  # registered path: the copy stage copies while the trainer runs on
                self.pipeline.copy(task, copies)
            else:
                self.pipeline.submit(task)
        kind = "received" if plan.has_gpu or plan.has_copies else "copied"
        return protocol.message(kind, msg["id"], step=msg["step"], waited_s=waited_s), Handoff(task, start)


def _inline_bytes(plan: Placement, text: str | None) -> bytes:
    """The bytes of the snapshot's inline tensors (base64 in the message, in descriptor order)."""
    if text is None:
        if plan.inline_bytes:
            raise ProtocolError(f"the snapshot has {len(plan.inline)} inline tensors but no inline bytes",
                                "bad_field")
        return b""
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("inline is not base64", "bad_field") from None
    if len(blob) != plan.inline_bytes:
        raise ProtocolError(f"inline carries {len(blob)} bytes; the inline tensors take {plan.inline_bytes}",
                            "bad_field")
    return blob
