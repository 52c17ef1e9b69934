"""What a ``snapshot`` message describes, and its acceptance: the layout (descriptors and tree,
checked once and then reused by number: client/layout.py, docs/PROTOCOL.md), the new values of
the tree's scalar nodes, where each tensor lies (``Placement``), and the task made of it.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from snapd import protocol
from snapd.daemon.buffer_reads import write_inline
from snapd.daemon.buffers import owner_uid
from snapd.daemon.pipeline import COPIED, Task
from snapd.errors import ProtocolError, SnapdError
from snapd.format.manifest import _check_tree
from snapd.format.saving import check_metrics
from snapd.format.tree import TensorLeaf

if TYPE_CHECKING:
    from snapd.daemon.sessions import Region, RegionSpan, Session


@dataclass
class Layout:
    """A snapshot message's descriptors and tree, checked once, reused by number (client/layout.py)."""

    number: int | None
    tensors: list[dict]
    tree: dict
    plan: Placement | None = None  # made with the first buffer it is placed over
    scalars: int = -1  # how many value nodes the tree has (counted when values first come)


@dataclass
class NewValues:
    """A snapshot's new values of its layout's scalar tree nodes: all of them (``values``), or the
    changed ones (``changes``: [index in pre-order, node] pairs; the others are the layout's)."""

    values: list[dict] | None
    changes: list[list] | None

    def nodes(self, layout: Layout) -> list[dict]:
        if self.values is not None:
            return self.values
        out = list(_scalar_nodes(layout.tree))
        for i, node in self.changes:
            out[i] = node
        return out


def layout_of(s: Session, msg: dict) -> tuple[Layout, NewValues | None]:
    """The layout of a ``snapshot`` message, its own or the connection's last one that it names,
    and the new values of that layout's scalar tree nodes, if the message brings any."""
    number, tensors, tree = msg.get("layout"), msg.get("tensors"), msg.get("tree")
    values, changes = msg.get("values"), msg.get("changes")
    if tensors is not None:
        if tree is None or values is not None or changes is not None:
            raise ProtocolError("a snapshot that sends tensors must send its tree, and no values", "bad_field")
        return Layout(number, tensors, tree), None
    if number is None or tree is not None:
        raise ProtocolError("a snapshot needs tensors and a tree, or the layout number of ones sent before "
                            "(and optionally new values)", "bad_field")
    if values is not None and changes is not None:
        raise ProtocolError("a snapshot sends values or changes, not both", "bad_field")
    layout = s.layout
    if layout is None or layout.number != number:
        raise ProtocolError(f"layout {number} is not known on this connection (the daemon keeps only the last "
                            "layout it accepted): send the tensors and tree", "unknown_layout")
    if values is not None or changes:
        if layout.scalars < 0:
            layout.scalars = sum(1 for _ in _scalar_nodes(layout.tree))
        if values is not None and len(values) != layout.scalars:
            raise ProtocolError(f"layout {number} has {layout.scalars} value nodes, the snapshot sent "
                                f"{len(values)} values", "bad_field")
        if changes and changes[-1][0] >= layout.scalars:  # (indices increase: protocol.py checked)
            raise ProtocolError(f"layout {number} has {layout.scalars} value nodes, the snapshot changes node "
                                f"{changes[-1][0]}", "bad_field")
    return layout, NewValues(values, changes) if values is not None or changes else None


def _scalar_nodes(node: dict) -> Iterator[dict]:
    """The value, float and bytes nodes of a (checked) tree in pre-order: flatten's visiting order."""
    t = node["t"]
    if t in ("dict", "list", "tuple"):
        for child in node["v"]:
            yield from _scalar_nodes(child)
    elif t != "tensor":
        yield node


def with_values(node: dict, values: Iterator[dict]) -> dict:
    """A copy of a (checked) tree whose value nodes are the next of ``values``, in pre-order."""
    t = node["t"]
    if t == "dict":
        return {"t": t, "k": node["k"], "v": [with_values(child, values) for child in node["v"]]}
    if t in ("list", "tuple"):
        return {"t": t, "v": [with_values(child, values) for child in node["v"]]}
    return node if t == "tensor" else next(values)


class Placement:
    """Where a layout's tensors lie, checked once: each one's span of the host buffer, and the
    registered-region bytes or the device allocation it is copied from. Placing the leaves over a
    buffer is then about 1 us a tensor; the checks cost twice that, on every snapshot before
    layouts were reused, while the trainer waited for the reply."""

    def __init__(self, tensors: list[dict], buf_size: int, regions: dict[int, Region], devices: set[str]) -> None:
        rows = []
        for t in tensors:
            a, b = t["offset"], t["offset"] + t["nbytes"]
            if b > buf_size:
                raise ProtocolError(f"{t['key']}: bytes {a}..{b} lie outside the {buf_size}-byte buffer", "bad_field")
            src = None
            if "region" in t:
                region = regions.get(t["region"])
                if region is None or t["region_offset"] + t["nbytes"] > region.size:
                    raise ProtocolError(f"{t['key']}: not inside a region this client registered", "bad_region")
                src = region.span(t["region_offset"], t["nbytes"])
            cuda = t.get("cuda")
            if cuda is not None and cuda["dev"] not in devices:
                raise ProtocolError(f"{t['key']}: this daemon cannot reach CUDA device {cuda['dev']} "
                                    f"(it sees: {', '.join(sorted(devices)) or 'none'})", "bad_field")
            rows.append((t["key"], t["kind"], t["dtype"], tuple(t["shape"]), a, b, src,
                         cuda if t["nbytes"] else None, "inline" in t))
        if len({r[0] for r in rows}) != len(rows):
            raise ProtocolError("two tensors share a key path", "bad_field")
        self.rows = rows
        self.end = max((r[5] for r in rows), default=0)
        self.raw_bytes = sum(r[5] - r[4] for r in rows)
        self.has_copies = any(r[6] is not None for r in rows)  # the registered path
        self.has_gpu = any(r[7] is not None for r in rows)  # the GPU path
        # bytes the client copies into the buffer itself (the plain path): it needs the lease first
        self.has_plain = any(r[6] is None and "cuda" not in t and not r[8] and r[5] > r[4]
                             for r, t in zip(rows, tensors))
        self.gpu_plans: dict = {}  # the GPU copier's plans for these descriptors (snapd/daemon/gpu_copy.py)
        self.inline = [i for i, r in enumerate(rows) if r[8]]  # tiny tensors whose bytes come in the message
        self.inline_bytes = sum(rows[i][5] - rows[i][4] for i in self.inline)
        # how the bytes reach the buffer (``snapd status``: is a job on the GPU path, or staging?)
        gpu = sum(r[5] - r[4] for r in rows if r[7] is not None)
        registered = sum(r[5] - r[4] for r in rows if r[6] is not None)
        self.by_path = {"cuda_ipc": gpu, "registered": registered, "inline": self.inline_bytes,
                        "client": self.raw_bytes - gpu - registered - self.inline_bytes}

    def check_fits(self, buf: np.ndarray) -> None:
        if self.end > buf.size:  # (a layout placed over a larger buffer, grown for another snapshot)
            raise ProtocolError(f"the snapshot needs {self.end} bytes, over the {buf.size}-byte buffer", "bad_field")

    def place(self, buf: np.ndarray) -> tuple[list[TensorLeaf], list[tuple[np.ndarray, RegionSpan]],
                                               list[tuple[TensorLeaf, dict]]]:
        """The leaves over ``buf``, the copies the daemon must make from registered regions
        (region bytes -> buffer), and the tensors it must copy from GPUs (leaf, `cuda` descriptor)."""
        leaves, copies, on_gpu = [], [], []
        for key, kind, dtype, shape, a, b, src, cuda, _ in self.rows:
            leaf = TensorLeaf(key, kind, dtype, shape, buf[a:b])
            if src is not None:
                copies.append((leaf.data, src))
            if cuda is not None:
                on_gpu.append((leaf, cuda))
            leaves.append(leaf)
        return leaves, copies, on_gpu


def accept_snapshot(server: Any, s: Session, msg: dict) -> tuple[bytes | None, Callable[[], None] | None]:
    """Check a ``snapshot`` message and make its task: the reply, and the hand-over to the task's
    stage that the server runs once the reply is out. With a ``lease``, the buffer it names; with
    ``nbytes`` instead (every tensor is copied by the daemon: nothing to write first), a buffer
    leased here, now or once one frees (the reply is None until then). Refused, whatever the
    reason, the lease goes back (the server's ``_refused``)."""
    layout, values = layout_of(s, msg)
    if msg.get("lease") is None:
        if msg.get("nbytes") is None:
            raise ProtocolError("a snapshot needs a lease, or nbytes when the daemon copies every tensor",
                                "bad_field")
        plan = _check(server, s, layout, server.config.buffer_cap)
        if plan.has_plain:
            raise ProtocolError("tensors whose bytes the client copies into the buffer need a lease: acquire "
                                "one first", "bad_field")
        metrics = check_metrics(msg["metrics"])
        blob = _inline_bytes(plan, msg.get("inline"))
        # (a buffer that holds the tensors as placed, whatever ``nbytes`` says)
        return server.acquire(s, msg["id"], max(msg["nbytes"], plan.end), msg["emergency"],
                              lambda lease, waited_s: _accepted(server, s, msg, layout, values, metrics, blob, lease,
                                                                waited_s)) or (None, None)
    buf = server.leases.take(s, msg["lease"])  # (refused from here on, the server frees the lease)
    plan = _check(server, s, layout, buf.view.size)
    plan.check_fits(buf.view)
    metrics = check_metrics(msg["metrics"])
    blob = _inline_bytes(plan, msg.get("inline"))
    return _accepted(server, s, msg, layout, values, metrics, blob, msg["lease"], 0.0)


def _inline_bytes(plan: Placement, text: str | None) -> bytes:
    """The bytes of the snapshot's inline tensors (base64 in the message, in descriptor order)."""
    if text is None:
        if plan.inline_bytes:
            raise ProtocolError(f"the snapshot has {len(plan.inline)} inline tensors but no inline bytes", "bad_field")
        return b""
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("inline is not base64", "bad_field") from None
    if len(blob) != plan.inline_bytes:
        raise ProtocolError(f"inline carries {len(blob)} bytes; the inline tensors take {plan.inline_bytes}",
                            "bad_field")
    return blob


def _check(server: Any, s: Session, layout: Layout, buf_size: int) -> Placement:
    """The layout's placement, made and its tree checked the first time it is used."""
    if layout.plan is None:
        devices = set(server.gpu.describe()) if server.gpu else set()
        layout.plan = Placement(layout.tensors, buf_size, s.regions, devices)
        try:
            _check_tree(layout.tree, len(layout.plan.rows))
        except SnapdError as e:
            layout.plan = None
            raise ProtocolError(f"tree: {e}", "bad_field") from None
    return layout.plan


def _accepted(server: Any, s: Session, msg: dict, layout: Layout, values: NewValues | None, metrics: dict,
              blob: bytes, lease: int, waited_s: float) -> tuple[bytes, Callable[[], None]]:
    plan, buf = layout.plan, server.pool.by_lease(lease)
    if layout.number is not None:
        s.layout = layout
    s.last_snapshot = {"step": msg["step"], "tensors": len(plan.rows), "bytes": plan.by_path}
    s.leases.discard(lease)  # the task owns the lease now
    task = Task(s.peer, msg["id"], s.job, msg["step"], metrics, msg["emergency"], layout.tree, [], lease,
                s.retention, plan.raw_bytes, s.jobs_root, buffer=(buf.path, plan.end, buf.view.ctypes.data, owner_uid(buf.uid) != os.geteuid()))
    server.tasks[task.seq] = task
    shuffle = plan.has_gpu and server.pipeline.gpu_shuffle(task) is not None
    if not plan.has_gpu and not plan.has_copies:
        server.leases.copied(task.lease)
        task.advance(COPIED)  # plain path: the client copied the bytes before sending this
    ready_events = msg.get("ready_events") or {}

    def start() -> None:
        # After the reply: place the leaves and fill in the new values (~1.5 us a tensor that the
        # trainer need not wait for; nothing here can fail once the layout was checked).
        task.leaves, copies, on_gpu = plan.place(buf.view)
        parts, pos, base = [], 0, buf.view.ctypes.data
        for i in plan.inline:  # before any stage reads the buffer (snapd.daemon.buffer_reads)
            leaf = task.leaves[i]
            parts.append((leaf.data.ctypes.data - base, leaf.data, blob[pos:pos + leaf.nbytes]))
            pos += leaf.nbytes
        write_inline(buf.path, plan.end, parts, task.buffer[3])
        if values is not None:
            task.tree = with_values(task.tree, iter(values.nodes(layout)))
        if on_gpu:  # GPU path: the copier reports queued, then copied
            server.gpu.copy(task, on_gpu, ready_events, buf.view, shuffle, copies, plan.gpu_plans)
        elif copies:  # registered path: the copy stage copies while the trainer runs on
            server.pipeline.copy(task, copies)
        else:
            server.pipeline.submit(task)
    kind = "received" if plan.has_gpu or plan.has_copies else "copied"
    return protocol.reply(kind, msg["id"], step=msg["step"], waited_s=waited_s), start
