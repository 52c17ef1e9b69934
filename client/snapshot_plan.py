"""What one snapshot describes, made by flattening the state or, for the state of the last
layout, from that layout's memo (client/state_memo.py): the leaves and their places in the host
buffer, the registered regions and CUDA allocations their bytes come from, the CPU leaves the
client copies (or sends inline), the descriptor signature, and the tensors behind the leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from snapd.client.layout import LayoutCache, Signature, buffer_offsets, signature
from snapd.client.state_memo import Hit, StateMemo
from snapd.format.leaves import TensorLeaf
from snapd.format.tree import flatten


class SnapshotPlan:
    """One snapshot's descriptors and what they were made from (read-only once made: a memo's
    template is shared by every snapshot that replays it)."""

    __slots__ = ("leaves", "offsets", "nbytes", "shared", "cuda", "plain", "staged", "leads", "anchors",
                 "sources", "tree", "scalars", "hit", "sig", "allocations", "memo")

    def __init__(self, leaves: list[TensorLeaf], offsets: list[int], nbytes: int,
                 shared: list[tuple[int, int] | None], cuda: dict[int, dict | None],
                 sources: list[Any]) -> None:
        self.leaves, self.offsets, self.nbytes, self.shared, self.cuda = leaves, offsets, nbytes, shared, cuda
        # CPU leaves whose bytes the client writes (into the leased buffer, or inline in the message)
        self.plain = [i for i, (leaf, sh) in enumerate(zip(leaves, shared))
                      if sh is None and not leaf.on_device and leaf.nbytes]
        self.staged = [i for i, d in cuda.items() if d is None]  # device leaves without CUDA IPC: copied here
        self.leads: dict[str, int] = {}  # each device the daemon copies from -> its first leaf (its stream's)
        first: dict[tuple[str, str], int] = {}  # each allocation the daemon maps -> its first leaf
        for i, d in cuda.items():
            if d is not None:
                self.leads.setdefault(d["dev"], i)
                first.setdefault((d["dev"], d["handle"]), i)
        self.anchors = list(first.values())
        self.sources = sources  # the tensor behind each leaf (the user's, or the copy flatten made)
        self.tree: dict | None = None  # flattened plans: the tree and its scalar nodes
        self.scalars: list[dict] | None = None
        self.hit: Hit | None = None  # replayed plans: the tensors and scalars the memo found
        self.sig: Signature | None = None
        self.allocations: list[tuple[int, int]] = []  # (address, allocation id) of each CUDA allocation used
        self.memo: StateMemo | None = None  # replayed plans: the memo replayed

    def signature(self, inline: list[int]) -> Signature:
        """The descriptor signature of a flattened plan (made once; a replay sends none)."""
        if self.sig is None:
            self.sig = signature(self.leaves, self.offsets, self.shared, self.cuda, inline)
        return self.sig

    def but(self, **fields: Any) -> SnapshotPlan:
        """A copy of this plan with ``fields`` replaced (the lists are shared, not copied)."""
        out = SnapshotPlan.__new__(SnapshotPlan)
        for name in self.__slots__:
            setattr(out, name, fields[name] if name in fields else getattr(self, name))
        return out


def flattened(state: Any, registered: Callable[[TensorLeaf], tuple[int, int] | None],
              export: Callable[[], Any]) -> SnapshotPlan:
    """The plan of ``state``, flattened (a new or changed state, or no memo)."""
    scalars: list[dict] = []
    tree, leaves = flatten(state, keep_device=True, scalars=scalars)
    offsets, pos = buffer_offsets(leaves)
    shared = [None if leaf.on_device else registered(leaf) for leaf in leaves]
    cuda: dict[int, dict | None] = {}
    plan_allocations: list[tuple[int, int]] = []
    if any(leaf.on_device for leaf in leaves):
        ex = export()
        cuda = ex.describe_all(leaves)
        plan_allocations = ex.allocations([leaves[i].ptr for i, d in cuda.items() if d is not None])
    plan = SnapshotPlan(leaves, offsets, pos, shared, cuda, [leaf.source for leaf in leaves])
    plan.tree, plan.scalars, plan.allocations = tree, scalars, plan_allocations
    return plan


def replayed(memo: StateMemo, hit: Hit, export: Callable[[], Any]) -> SnapshotPlan | None:
    """The plan of a state the memo recognised; None if a CUDA allocation it used is gone (freed,
    perhaps made again at the same address: it needs a new handle), so the state is flattened."""
    t: SnapshotPlan = memo.template
    if t.allocations and not export().still_live(t.allocations):
        return None
    leaves = memo.leaves
    if t.staged:  # these are copied here, from the tensor itself
        leaves = list(leaves)
        for i in t.staged:
            m = leaves[i]
            leaves[i] = TensorLeaf(m.key, m.kind, m.dtype, m.shape, None, hit.sources[i], m.nbytes, m.ptr,
                                   m.on_device)
    return t.but(leaves=leaves, sources=hit.sources, hit=hit, memo=memo)


def remember(number: int, state: Any, plan: SnapshotPlan) -> StateMemo | None:
    """A memo of the layout ``number`` that ``plan`` (flattened from ``state``) defined."""
    # a memo keeps no tensor alive
    template = plan.but(leaves=[], sources=[], tree=None, scalars=None, sig=None)
    return StateMemo.of(number, state, plan.tree, plan.leaves, template)


class Planner:
    """A connection's choice between replaying the last layout's memo and flattening, and the
    memo's upkeep: made when a layout is defined, made again when the state moved once (a
    parameter rebound: the layout may stay, the addresses did not), dropped when the state moves
    every time (new tensors each step: the walk would only add to flattening)."""

    def __init__(self, layouts: LayoutCache, registered: Callable[[TensorLeaf], tuple[int, int] | None],
                 export: Callable[[], Any]) -> None:
        self._layouts, self._registered, self._export = layouts, registered, export
        self._memo: StateMemo | None = None
        self._number: int | None = None  # the layout the memo was last made for (None: none yet)
        self._misses = 0  # the memo's misses in a row

    def plan(self, state: Any) -> SnapshotPlan:
        memo = self._memo
        if memo is not None and memo.number == self._layouts.current:
            hit = memo.match(state)
            plan = replayed(memo, hit, self._export) if hit is not None else None
            if plan is not None:
                self._misses = 0
                return plan
            self._misses += 1
        return self.flatten(state)

    def flatten(self, state: Any) -> SnapshotPlan:
        return flattened(state, self._registered, self._export)

    def taken(self, state: Any, plan: SnapshotPlan) -> None:
        """The daemon took ``plan`` (flattened from ``state``): keep the memo current."""
        number = self._layouts.current
        if number is None or plan.tree is None:
            return
        if number != self._number:  # a new layout
            self._memo, self._number, self._misses = remember(number, state, plan), number, 0
        elif self._misses == 1:  # the same layout, but the state moved (once, so far)
            self._memo = remember(number, state, plan)
        elif self._misses > 1:
            self._memo = None  # moves every time: flatten without trying until the next layout

    def forget(self) -> None:
        """Tensors moved under the client's feet (``share``): flatten the next state."""
        self._memo, self._number, self._misses = None, None, 0


def layout_fields(plan: SnapshotPlan, inline: list[int], layouts: LayoutCache) -> dict[str, Any]:
    """The ``snapshot`` request's fields that describe ``plan`` (``inline``: the leaves that travel
    in the message): a replayed plan's layout number and changed values, else its tensors."""
    if plan.memo is not None:  # replayed: the layout the memo belongs to, and any new scalar values
        fields: dict[str, Any] = {"layout": plan.memo.number}
        if plan.hit.changed:  # (a step counter, say: only it)
            fields["changes"] = plan.hit.changes()
        return fields
    return layouts.fields(plan.tree, plan.scalars, plan.signature(inline))
