"""What a ``snapshot`` message describes: its layout (descriptors and tree, checked once and then
reused by number: client/layout.py, docs/PROTOCOL.md), the new values of the tree's scalar nodes,
and where each tensor lies (``Placement``). Accepting it is snapd.daemon.intake's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from snapd.daemon.regions import Region, RegionSpan
from snapd.errors import ProtocolError
from snapd.format.leaves import TensorLeaf


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


def layout_of(current: Layout | None, msg: dict) -> tuple[Layout, NewValues | None]:
    """The layout of a ``snapshot`` message, its own or ``current`` (the connection's last one) if
    it names it, and the new values of that layout's scalar tree nodes, if the message brings any."""
    number, tensors, tree = msg.get("layout"), msg.get("tensors"), msg.get("tree")
    values, changes = msg.get("values"), msg.get("changes")
    if tensors is not None:
        if tree is None or values is not None or changes is not None:
            raise ProtocolError("a snapshot that sends tensors must send its tree, and no values",
                                "bad_field")
        if number is None:
            raise ProtocolError("a snapshot that sends tensors must number their layout (layout)",
                                "bad_field")
        return Layout(number, tensors, tree), None
    if number is None or tree is not None:
        raise ProtocolError("a snapshot needs tensors and a tree, or the layout number of ones sent before "
                            "(and optionally new values)", "bad_field")
    if values is not None and changes is not None:
        raise ProtocolError("a snapshot sends values or changes, not both", "bad_field")
    layout = current
    if layout is None or layout.number != number:
        raise ProtocolError(f"layout {number} is not known on this connection (the daemon keeps only the "
                            "last layout it accepted): send the tensors and tree", "unknown_layout")
    if values is not None or changes:
        if layout.scalars < 0:
            layout.scalars = sum(1 for _ in _scalar_nodes(layout.tree))
        if values is not None and len(values) != layout.scalars:
            raise ProtocolError(f"layout {number} has {layout.scalars} value nodes, the snapshot sent "
                                f"{len(values)} values", "bad_field")
        if changes and changes[-1][0] >= layout.scalars:  # (indices increase: protocol.py checked)
            raise ProtocolError(f"layout {number} has {layout.scalars} value nodes, the snapshot changes "
                                f"node {changes[-1][0]}", "bad_field")
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


@dataclass(frozen=True)
class Placed:
    """One tensor of a placement: its leaf's fields, its span ``[start, end)`` of the host buffer,
    and where its bytes come from (a registered region, a device, the message, or the client)."""

    key: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    region: RegionSpan | None  # the registered path: the daemon copies from the client's region
    cuda: dict | None  # the GPU path: the `cuda` descriptor (None for an empty tensor)
    inline: bool  # tiny tensors whose bytes come in the message
    placement: tuple | None = None  # a DTensor shard's (global shape, offsets, write): TensorLeaf.placement

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Placement:
    """Where a layout's tensors lie, checked once: each one's span of the host buffer, and the
    registered-region bytes or the device allocation it is copied from. Each later snapshot of the
    layout only places the leaves over its buffer (docs/PROTOCOL.md, Layouts)."""

    def __init__(self, tensors: list[dict], buf_size: int, regions: dict[int, Region],
                 devices: set[str]) -> None:
        rows = []
        for t in tensors:
            a, b = t["offset"], t["offset"] + t["nbytes"]
            if b > buf_size:
                raise ProtocolError(f"{t['key']}: bytes {a}..{b} lie outside the {buf_size}-byte buffer",
                                    "bad_field")
            src = None
            if "region" in t:
                region = regions.get(t["region"])
                if region is None or t["region_offset"] + t["nbytes"] > region.size:
                    raise ProtocolError(f"{t['key']}: not inside a region this client registered",
                                        "bad_region")
                src = region.span(t["region_offset"], t["nbytes"])
            cuda = t.get("cuda")
            if cuda is not None and cuda["dev"] not in devices:
                raise ProtocolError(f"{t['key']}: this daemon cannot reach CUDA device {cuda['dev']} "
                                    f"(it sees: {', '.join(sorted(devices)) or 'none'})", "bad_field")
            g = t.get("global")
            rows.append(Placed(t["key"], t["kind"], t["dtype"], tuple(t["shape"]), a, b, src,
                               cuda if t["nbytes"] else None, "inline" in t,
                               (tuple(g["shape"]), tuple(g["offsets"]), g["write"]) if g else None))
        if len({r.key for r in rows}) != len(rows):
            raise ProtocolError("two tensors share a key path", "bad_field")
        self.rows = rows
        self.end = max((r.end for r in rows), default=0)
        self.raw_bytes = sum(r.nbytes for r in rows)
        self.has_copies = any(r.region is not None for r in rows)  # the registered path
        self.has_gpu = any(r.cuda is not None for r in rows)  # the GPU path
        # bytes the client copies into the buffer itself (the plain path): it needs the lease first
        self.has_plain = any(r.region is None and "cuda" not in t and not r.inline and r.nbytes
                             for r, t in zip(rows, tensors))
        self.gpu_plans: dict = {}  # the GPU copier's plans for these descriptors (snapd/daemon/gpu_copy.py)
        self.inline = [i for i, r in enumerate(rows) if r.inline]
        self.inline_bytes = sum(rows[i].nbytes for i in self.inline)
        # how the bytes reach the buffer (``snapd status``: is a job on the GPU path, or staging?)
        gpu = sum(r.nbytes for r in rows if r.cuda is not None)
        registered = sum(r.nbytes for r in rows if r.region is not None)
        self.by_path = {"cuda_ipc": gpu, "registered": registered, "inline": self.inline_bytes,
                        "client": self.raw_bytes - gpu - registered - self.inline_bytes}

    def check_fits(self, buf: np.ndarray) -> None:
        if self.end > buf.size:  # (a layout placed over a larger buffer, grown for another snapshot)
            raise ProtocolError(f"the snapshot needs {self.end} bytes, over the {buf.size}-byte buffer",
                                "bad_field")

    def place(self, buf: np.ndarray) -> tuple[list[TensorLeaf], list[tuple[np.ndarray, RegionSpan]],
                                               list[tuple[TensorLeaf, dict]]]:
        """The leaves over ``buf``, the copies the daemon must make from registered regions
        (region bytes -> buffer), and the tensors it must copy from GPUs (leaf, `cuda` descriptor)."""
        leaves, copies, on_gpu = [], [], []
        for r in self.rows:
            leaf = TensorLeaf(r.key, r.kind, r.dtype, r.shape, buf[r.start:r.end])
            leaf.placement = r.placement
            if r.region is not None:
                copies.append((leaf.data, r.region))
            if r.cuda is not None:
                on_gpu.append((leaf, r.cuda))
            leaves.append(leaf)
        return leaves, copies, on_gpu
