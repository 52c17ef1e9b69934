"""The two halves of layout reuse agree: the client's scalar nodes (flatten's visiting order) are the
daemon's (a pre-order walk of the tree), so values sent alone land in the right places."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from snapd.client.layout import LayoutCache, buffer_offsets, signature
from snapd.daemon.layouts import Placement, _scalar_nodes, with_values
from snapd.errors import ProtocolError
from snapd.format.tree import build, flatten


def _state(a, b, c) -> dict:
    return {"z": a, "m": [np.zeros(3), (b, {"deep": [c, np.ones(2)], 5: "five"}), None],
            "a": {"lr": b, "nan": math.nan, "raw": b"\x01", "t": np.int8(3)}, 2: [[c]]}


def test_scalars_are_in_the_daemons_order() -> None:
    scalars: list[dict] = []
    tree, leaves = flatten(_state(1, 2.5, "x"), scalars=scalars)
    assert [id(n) for n in _scalar_nodes(tree)] == [id(n) for n in scalars]
    assert len(scalars) == 9 and len(leaves) == 3
    # new values, put in by the daemon, rebuild the state flatten would have made from them
    new: list[dict] = []
    new_tree, _ = flatten(_state(7, math.inf, b"y"), scalars=new)
    filled = with_values(tree, iter(json.loads(json.dumps(new))))
    assert filled == new_tree and tree != new_tree
    got = build(filled, lambda i, key: i)
    assert got["z"] == 7 and got["a"]["lr"] == math.inf and got["m"][1][1]["deep"][0] == b"y"
    assert got[2] == [[b"y"]] and got["m"][1][1][5] == "five"


def test_layout_cache_sends_what_changed() -> None:
    cache = LayoutCache()

    def fields(state) -> dict:
        scalars: list[dict] = []
        tree, leaves = flatten(state, scalars=scalars)
        offsets, _ = buffer_offsets(leaves)
        out = cache.fields(tree, scalars, signature(leaves, offsets, [None] * len(leaves), {}, []))
        assert all(n["t"] != "scalar" for n in scalars)  # the comparison leaves the tree as it was
        return out
    first = fields(_state(1, 2.5, "x"))
    assert set(first) == {"layout", "tensors", "tree"} and first["layout"] == 1
    assert fields(_state(1, 2.5, "x")) == {"layout": 1}
    changed = fields(_state(2, 2.5, "x"))
    assert changed["layout"] == 1 and [n["v"] for n in changed["values"]][0] == 2
    assert set(fields(_state(1.0, 2.5, "x"))) == {"layout", "values"}  # 1.0 is not 1 in the snapshot
    assert fields(_state(1, 2.5, "x")) == {"layout": 1}
    other = fields({**_state(1, 2.5, "x"), "new": np.zeros(1)})
    assert other["layout"] == 2 and "tensors" in other
    cache.forget()
    assert fields({**_state(1, 2.5, "x"), "new": np.zeros(1)})["layout"] == 3


def test_placement_checks_once_and_places_over_any_buffer() -> None:
    tensors = [{"key": "a", "kind": "numpy", "dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8},
               {"key": "b", "kind": "numpy", "dtype": "uint8", "shape": [4], "offset": 64, "nbytes": 4}]
    plan = Placement(tensors, 128, {}, set())
    assert plan.raw_bytes == 12 and not plan.has_copies and not plan.has_gpu
    for fill in (1, 2):
        buf = np.full(128, fill, np.uint8)
        leaves, copies, on_gpu = plan.place(buf)
        assert [leaf.key for leaf in leaves] == ["a", "b"] and not copies and not on_gpu
        assert leaves[1].data.tobytes() == bytes([fill]) * 4
        buf[64] = 9
        assert leaves[1].data[0] == 9  # a view of the buffer, not a copy
    with pytest.raises(ProtocolError, match="over the 32-byte buffer"):
        plan.check_fits(np.zeros(32, np.uint8))
    with pytest.raises(ProtocolError, match="outside the 64-byte buffer"):
        Placement(tensors, 64, {}, set())
    with pytest.raises(ProtocolError, match="not inside a region"):
        Placement([{**tensors[0], "region": 3, "region_offset": 0}], 128, {}, set())
    with pytest.raises(ProtocolError, match="cannot reach CUDA device GPU-1"):
        Placement([{**tensors[0], "cuda": {"dev": "GPU-1"}}], 128, {}, {"GPU-2"})
    with pytest.raises(ProtocolError, match="share a key path"):
        Placement([tensors[0], {**tensors[1], "key": "a"}], 128, {}, set())
