"""The tensor half of a ``snapshot`` message, and the cache that sends it only when it changes.

A training loop snapshots the same tensors, from the same places, step after step, so the
descriptors (key, dtype, shape, where the bytes lie) rarely change. Encoding them as JSON, and
parsing and checking them in the daemon, cost about 10 us a tensor (2.5 ms of the trainer's
stall for 256 tensors on the GPU path). So each connection numbers its layouts: the snapshot that
brings a new one sends its descriptors and tree with its number, later ones only the number (and
the tree again when its non-tensor values changed, a step counter in the state, say). The daemon
keeps the last layout it accepted per connection, and answers ``unknown_layout`` for any other
number; the client then sends that snapshot in full (docs/PROTOCOL.md).
"""

from __future__ import annotations

import json
from typing import Any

from snapd.format.leaves import TensorLeaf

ALIGN = 64  # every tensor starts at a multiple of this in the host buffer


def buffer_offsets(leaves: list[TensorLeaf]) -> tuple[list[int], int]:
    """Where each leaf's bytes go in the host buffer, and the bytes the snapshot needs."""
    offsets, pos = [], 0
    for leaf in leaves:
        pos += -pos % ALIGN
        offsets.append(pos)
        pos += leaf.nbytes
    return offsets, pos


Signature = list[tuple]  # one tuple per leaf: what its descriptor says, cheaper to make and compare


def signature(leaves: list[TensorLeaf], offsets: list[int], shared: list[tuple[int, int] | None],
              cuda: dict[int, dict | None], inline: list[int]) -> Signature:
    """Each leaf's key, kind, dtype, shape, place in the leased buffer, size, where the daemon
    gets it from: a registered region (id, offset), a CUDA allocation (a `cuda` descriptor), or
    the message (``inline``: indices of tiny CPU tensors whose bytes travel with it), and a DTensor
    shard's place in its global tensor."""
    sig = [(leaf.key, leaf.kind, leaf.dtype, leaf.shape, offsets[i], leaf.nbytes, shared[i], cuda.get(i),
            leaf.placement) for i, leaf in enumerate(leaves)]
    for i in inline:
        sig[i] = (*sig[i][:6], "inline", None, sig[i][8])
    return sig


def descriptors(sig: Signature) -> list[dict]:
    """The ``tensors`` of a snapshot message (docs/PROTOCOL.md): made only for a new layout."""
    out = []
    for key, kind, dtype, shape, offset, nbytes, sh, c, placed in sig:
        d = {"key": key, "kind": kind, "dtype": dtype, "shape": list(shape), "offset": offset,
             "nbytes": nbytes}
        if sh == "inline":
            d["inline"] = True
        elif sh is not None:
            d["region"], d["region_offset"] = sh
        if c is not None:
            d["cuda"] = c
        if placed is not None:  # a DTensor's local shard (snapd.format.leaves)
            d["global"] = {"shape": list(placed[0]), "offsets": list(placed[1]), "write": placed[2]}
        out.append(d)
    return out


class LayoutCache:
    """The layout this connection last sent in full: its number, descriptors, the skeleton of its
    tree with the scalar nodes blanked, and those scalar nodes."""

    def __init__(self) -> None:
        self._number = 0
        self._sig: Signature | None = None
        self._skeleton: dict | None = None
        self._values = "[]"  # the layout's scalar nodes as JSON (1 == 1.0 == True in Python; not in JSON)

    def fields(self, tree: dict, scalars: list[dict], sig: Signature) -> dict[str, Any]:
        """The layout fields of the next snapshot message. ``scalars`` are the value nodes of
        ``tree`` in pre-order (``flatten(..., scalars=)``): a step counter or a learning rate
        that changed travels as ``values``, not as a new layout."""
        # C-level comparisons: ~40 us for 256 tensors
        if sig == self._sig and self._same_shape(tree, scalars):
            if json.dumps(scalars) == self._values:
                return {"layout": self._number}
            return {"layout": self._number, "values": scalars}
        return self.define(tree, scalars, sig)

    def define(self, tree: dict, scalars: list[dict], sig: Signature) -> dict[str, Any]:
        """A new layout number for these descriptors and tree, sent in full (also after
        ``unknown_layout``: the daemon never took the layout named, or took another since, from a
        snapshot a signal handler sent in between, say)."""
        self._number += 1
        self._sig, self._values = sig, json.dumps(scalars)
        saved = _blank(scalars)
        self._skeleton = json.loads(json.dumps(tree))  # a copy, blanked (the tree itself is sent as it is)
        _restore(scalars, saved)
        return {"layout": self._number, "tensors": descriptors(sig), "tree": tree}

    def _same_shape(self, tree: dict, scalars: list[dict]) -> bool:
        saved = _blank(scalars)
        try:
            return tree == self._skeleton
        finally:
            _restore(scalars, saved)

    @property
    def current(self) -> int | None:
        """The number of the layout last defined, or None once forgotten (the daemon refused it)."""
        return self._number if self._sig is not None else None

    def forget(self) -> None:
        self._sig = self._skeleton = None


def _blank(scalars: list[dict]) -> list[tuple[Any, Any]]:
    saved = [(n["t"], n["v"]) for n in scalars]
    for n in scalars:
        n["t"], n["v"] = "scalar", None
    return saved


def _restore(scalars: list[dict], saved: list[tuple[Any, Any]]) -> None:
    for n, (t, v) in zip(scalars, saved):
        n["t"], n["v"] = t, v
