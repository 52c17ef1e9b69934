"""Layouts sent once (client/layout.py): a training loop's later snapshots carry a layout number
and the tree's changed values instead of every descriptor, and still restore exactly what was
saved; a daemon that does not know a layout says so and the client sends it in full; bad layout
fields are refused with the lease given back and the daemon serving on."""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.client.connection import Connection
from snapd.errors import SnapdError


def _session(endpoint: str, job: str) -> Connection:
    """A raw connection after hello: messages written by hand, as a client of another language would."""
    conn = Connection(endpoint, 5.0)
    conn.call("hello", job=job, pid=os.getpid(), keep_last=1, keep_every_steps=None, best=None,
              on_busy="wait", root=None)
    return conn


def _state(step, lr, w: np.ndarray, extra=None) -> dict:
    s = {"model": {"w": w, "b": torch.arange(5, dtype=torch.float64) * step},
         "optim": {"param_groups": [{"lr": lr, "betas": (0.9, 0.999)}], "step": torch.tensor(float(step))},
         "step": step, "tag": b"\x00\xff", "note": None}
    if extra:
        s.update(extra)
    return s


@pytest.mark.parametrize("share", [False, True], ids=["plain", "registered"])
def test_changed_values_travel_alone_and_restore_exactly(daemon, sent, share) -> None:
    w = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    # 1, 1.0 and True must not be taken for each other
    lrs = [0.1, 0.1, 1, 1.0, True, math.nan, math.inf, 0.05]
    with snapd.connect("lay", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        if share:
            state0 = _state(0, lrs[0], w)
            c.share(state0["model"])
            w = state0["model"]["w"]
        pendings = []
        for step, lr in enumerate(lrs):
            c.fence()  # (what guard(optimizer) does: the daemon may still be copying the region)
            w[step] = step  # the tensor bytes change in place, as a trainer's do
            pendings.append((c.snapshot(_state(step, lr, w), step=step), w.copy(), lr))
        for p, w_then, lr in pendings:
            p.wait(30)
            got = c.restore(p.step)
            assert got["step"] == p.step and type(got["step"]) is int
            got_lr = got["optim"]["param_groups"][0]["lr"]
            assert type(got_lr) is type(lr) and (got_lr == lr or math.isnan(lr) and math.isnan(got_lr))
            assert got["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
            assert got["tag"] == b"\x00\xff" and got["note"] is None
            assert np.array_equal(got["model"]["w"], w_then)
            assert torch.equal(got["model"]["b"], torch.arange(5, dtype=torch.float64) * p.step)
            assert got["optim"]["step"].item() == p.step
    assert "tensors" in sent[0] and "tree" in sent[0]
    for fields in sent[1:]:
        assert "tensors" not in fields and "tree" not in fields  # only the layout's number, and values
        assert fields["layout"] == sent[0]["layout"]
        assert "values" in fields  # the step changed every time


def test_a_new_structure_or_shape_is_a_new_layout(daemon, sent) -> None:
    w = np.ones((4, 4), np.float32)
    with snapd.connect("shape", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        states = [_state(1, 0.1, w), _state(1, 0.1, w),  # unchanged: nothing but the number
                  _state(2, 0.1, w, {"new": 3}),  # a key more
                  _state(3, 0.1, np.ones((2, 8), np.float32)),  # same bytes, another shape
                  _state(4, 0.1, w),
                  # a layout saved with lr 1, then 1.0 and True: equal in Python, not in JSON
                  _state(4, 1, w, {"x": 0}), _state(4, 1.0, w, {"x": 0}), _state(4, True, w, {"x": 0})]
        for step, s in enumerate(states):
            c.snapshot(s, step=step).wait(30)
        for step, s in enumerate(states):
            got = c.restore(step)
            assert got["model"]["w"].shape == s["model"]["w"].shape and got.get("new") == s.get("new")
            lr = got["optim"]["param_groups"][0]["lr"]
            assert type(lr) is type(s["optim"]["param_groups"][0]["lr"]) \
                    and lr == s["optim"]["param_groups"][0]["lr"]
    assert [("tensors" in f, "values" in f) for f in sent] == [
        (True, False), (False, False), (True, False), (True, False), (True, False),
        (True, False), (False, True), (False, True)]
    assert sorted({f["layout"] for f in sent}) == [1, 2, 3, 4, 5]


def test_an_unknown_layout_is_sent_again_in_full(daemon, sent) -> None:
    """The daemon keeps one layout per connection; a number it does not hold (a snapshot sent from
    a signal handler in between, say) gets unknown_layout, and the client resends in full."""
    w = np.arange(1024, dtype=np.float32)  # (over the inline limit: this snapshot takes a lease)
    with snapd.connect("again", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot(_state(0, 0.1, w), step=0).wait(30)
        c._layouts._number += 7  # the client now names a layout this daemon never accepted
        c.snapshot(_state(1, 0.2, w), step=1).wait(30)
        c.snapshot(_state(2, 0.3, w), step=2).wait(30)
        assert c.restore(1)["optim"]["param_groups"][0]["lr"] == 0.2
        assert c.restore(2)["optim"]["param_groups"][0]["lr"] == 0.3
        assert c.status()["buffers"]["busy"] == 0
    assert "tensors" not in sent[1] and sent[1]["layout"] == 8  # refused: unknown_layout
    assert "tensors" in sent[2] and sent[2]["layout"] == 9  # the same snapshot, in full
    assert sent[2]["lease"] != sent[1]["lease"]  # (the refusal gave the first lease back)
    assert "tensors" not in sent[3] and sent[3]["layout"] == 9


def test_a_snapshot_sent_from_a_signal_handler_mid_snapshot(daemon, preempt_next_send) -> None:
    """A preemption handler runs between any two bytecodes: here, just before the outer
    snapshot's message goes out, it sends an emergency snapshot of another state (a new layout,
    so the daemon forgets the one the outer message names). Both must restore exactly."""
    w = np.arange(64, dtype=np.float32)
    other = {"only": torch.full((3,), 5.0), "flag": True}
    with snapd.connect("reenter", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot(_state(0, 0.1, w), step=0).wait(30)
        preempt_next_send(c, other)
        c.snapshot(_state(1, 0.2, w), step=1).wait(30)  # named the old layout: resent in full
        c.snapshot(_state(2, 0.3, w), step=2).wait(30)
        got = c.restore(99)
        assert torch.equal(got["only"], other["only"]) and got["flag"] is True
        for step, lr in ((1, 0.2), (2, 0.3)):
            got = c.restore(step)
            assert got["step"] == step and got["optim"]["param_groups"][0]["lr"] == lr
            assert np.array_equal(got["model"]["w"], w)


def test_bad_layout_fields_are_refused_and_the_daemon_serves_on(daemon) -> None:
    conn = _session(daemon.endpoint, "bad")
    try:
        tensors = [{"key": "w", "kind": "numpy", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}]
        tree = {"t": "dict", "k": ["w", "step"], "v": [{"t": "tensor", "i": 0}, {"t": "value", "v": 1}]}
        head = {"step": 1, "metrics": {}, "emergency": False}

        def lease() -> int:
            return conn.call("acquire", nbytes=16, emergency=False)["lease"]
        first = lease()
        done = conn.call("snapshot", lease=first, **head, layout=1, tensors=tensors, tree=tree)
        assert conn.wait(done["id"], 30)["type"] == "persisted"

        def held_buffers() -> int:
            (me,) = [c for c in conn.call("status")["clients"] if c["job"] == "bad"]
            return me["held_buffers"]
        for fields, words in [
            ({"layout": 1, "step": "one"}, "step"),  # refused while the message is read
            ({"layout": 2}, "layout 2 is not known"),
            ({"layout": 1, "values": [{"t": "value", "v": 1}, {"t": "value", "v": 2}]}, "has 1 value nodes"),
            ({"layout": 1, "values": [{"t": "dict", "k": [], "v": []}]}, "value, float or bytes node"),
            ({"layout": 1, "values": [{"t": "float", "v": "1e9"}]}, "value, float or bytes node"),
            ({"layout": 1, "changes": [[1, {"t": "value", "v": 2}]]}, "changes node 1"),
            ({"layout": 1, "changes": [[0, {"t": "value", "v": 2}], [0, {"t": "value", "v": 3}]]},
             "indices increasing"),
            ({"layout": 1, "changes": [{"t": "value", "v": 2}]}, "an [index, node] pair"),
            ({"layout": 1, "changes": [[0, {"t": "tensor", "i": 0}]]}, "value, float or bytes node"),
            ({"layout": 1, "changes": [[0, {"t": "value", "v": 2}]], "values": [{"t": "value", "v": 2}]},
             "values or changes, not both"),
            ({"layout": 1, "tree": tree}, "layout number of ones sent before"),
            ({"layout": 1, "tensors": tensors}, "must send its tree"),
            ({}, "needs tensors and a tree"),
        ]:
            held = lease()
            with pytest.raises(SnapdError) as e:
                conn.call("snapshot", lease=held, **{**head, **fields})
            assert words in str(e.value), e.value
            # refused, whatever the reason: the lease went back with the refusal, the buffer is free
            with pytest.raises(SnapdError, match="is not yours"):
                conn.call("release", lease=held)
            assert held_buffers() == 0
        ok = conn.call("snapshot", lease=lease(), **head, layout=1, values=[{"t": "value", "v": 7}])
        assert ok["type"] == "copied"
        ok = conn.call("snapshot", lease=lease(), **{**head, "step": 2}, layout=1,
                       changes=[[0, {"t": "value", "v": 8}]])
        assert ok["type"] == "copied"
        assert conn.wait(ok["id"], 30)["type"] == "persisted"
        got = snapd.load(daemon.root, "bad", 2)  # the layout's tree, with the one changed value put in
        assert got["step"] == 8 and got["w"].shape == (4,)
        assert conn.call("status")["buffers"]["busy"] <= 2  # the accepted snapshots still in flight, at most
    finally:
        conn.close()


def _hold_all_buffers(endpoint: str, n: int = 2) -> tuple[Connection, list[int]]:
    """Another client's connection holding every host buffer (granted, no snapshot sent yet)."""
    other = _session(endpoint, "holder")
    return other, [other.call("acquire", nbytes=64, emergency=False)["lease"] for _ in range(n)]


def test_a_state_the_daemon_copies_needs_no_acquire(start, monkeypatch) -> None:
    """Every tensor registered: the snapshot goes without a lease (one round trip), waits in the
    daemon for a buffer like an acquire would, and is skipped there with on_busy skip."""
    daemon = start("--max-host-memory-bytes", str(64 << 20))  # a fixed pool: two buffers, no more
    sends: list[tuple[Connection, str]] = []
    real = Connection.send
    monkeypatch.setattr(Connection, "send", lambda self, kind,
                        **f: (sends.append((self, kind)), real(self, kind, **f))[1])
    state = {"w": np.arange(4096, dtype=np.float32), "step": 0}
    with snapd.connect("noacq", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.share(state)
        c.snapshot(state, step=0).wait(30)
        kinds = [kind for conn, kind in sends if conn is c._conn]
        assert kinds.count("acquire") == 0 and kinds.count("snapshot") == 1
        other, held = _hold_all_buffers(daemon.endpoint)
        try:
            with snapd.connect("noacq-skip", endpoint=daemon.endpoint, spawn=False,
                               on_busy="skip") as skipper:
                skipper.share(shared := {"v": np.ones(8)})
                assert skipper.snapshot(shared, step=1).skipped  # refused in the daemon: no buffer free
            c.fence()
            state["w"][:] = 7
            state["step"] = 1
            releaser = threading.Timer(0.5, lambda: [other.call("release", lease=x) for x in held])
            releaser.start()
            t = time.monotonic()
            p = c.snapshot(state, step=1)  # returns once a buffer freed and the daemon took the snapshot
            assert time.monotonic() - t >= 0.4 and p.waited_s >= 0.3
            releaser.join()
            p.wait(30)
        finally:
            other.close()
        got = c.restore(1)
        assert np.all(got["w"] == 7) and got["step"] == 1
        assert np.array_equal(c.restore(0)["w"], np.arange(4096, dtype=np.float32))
        kinds = [kind for conn, kind in sends if conn is c._conn]
    assert "acquire" not in kinds and kinds.count("snapshot") == 2


def test_lease_free_snapshots_are_refused_when_the_client_has_bytes_to_write(daemon) -> None:
    conn = _session(daemon.endpoint, "nolease")
    try:
        plain = [{"key": "w", "kind": "numpy", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}]
        tree = {"t": "tensor", "i": 0}
        head = {"step": 1, "metrics": {}, "emergency": False, "layout": 1}
        with pytest.raises(SnapdError, match="need a lease: acquire one first"):
            conn.call("snapshot", **head, nbytes=16, tensors=plain, tree=tree)
        with pytest.raises(SnapdError, match="needs a lease, or nbytes"):
            conn.call("snapshot", **head, tensors=plain, tree=tree)
        with pytest.raises(SnapdError, match="over the largest host buffer"):
            conn.call("snapshot", **head, nbytes=1 << 40, tensors=[], tree={"t": "dict", "k": [], "v": []})
        assert conn.call("status")["buffers"]["busy"] == 0
        empty = conn.call("snapshot", **head, nbytes=0, tensors=[], tree={"t": "dict", "k": [], "v": []})
        assert empty["type"] == "copied"  # nothing to copy: taken at once
    finally:
        conn.close()


def test_tiny_cpu_tensors_travel_inline_beside_registered_ones(daemon, sent) -> None:
    """A GPU state's optimizer keeps its step counters as CPU scalars (Adam without capturable):
    those bytes come in the message, so the snapshot still needs no acquire."""
    state = {"w": np.arange(4096, dtype=np.float32), "step": 0}
    with snapd.connect("inline", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.share(state)
        for step in range(4):
            c.fence()
            state["w"][0] = step
            s = {**state, "step": step,
                 "optim": {i: {"step": torch.tensor(float(step * 10 + i))} for i in range(5)},
                 "small": np.full(64, step, np.int32), "empty": torch.zeros(0)}  # 256 bytes: at the limit
            c.snapshot(s, step=step).wait(30)
        for step in range(4):
            got = c.restore(step)
            assert got["w"][0] == step and np.array_equal(got["w"][1:], np.arange(1, 4096, dtype=np.float32))
            assert [got["optim"][i]["step"].item() for i in range(5)] == [step * 10.0 + i for i in range(5)]
            assert np.array_equal(got["small"], np.full(64, step, np.int32)) and got["empty"].numel() == 0
    assert all("lease" not in f and "inline" in f for f in sent)
    assert "tensors" in sent[0] and all("tensors" not in f for f in sent[1:])  # the bytes are not the layout
    assert sum(d.get("inline", False) for d in sent[0]["tensors"]) == 6


def test_bad_inline_bytes_are_refused(daemon) -> None:
    conn = _session(daemon.endpoint, "badinline")
    try:
        t = [{"key": "s", "kind": "torch", "dtype": "float32", "shape": [], "offset": 0, "nbytes": 4,
              "inline": True}]
        base = {"step": 1, "metrics": {}, "emergency": False, "nbytes": 4, "layout": 1, "tensors": t,
                "tree": {"t": "tensor", "i": 0}}
        for fields, words in [({}, "inline tensors but no inline bytes"),
                              ({"inline": "AAAAAAAA"}, "carries 6 bytes"),
                              ({"inline": "***"}, "not base64"),
                              ({"tensors": [{**t[0], "inline": 1}], "inline": "AAAAAA=="},
                               "inline must be true"),
                              ({"tensors": [{**t[0], "shape": [65], "nbytes": 260}], "inline": ""},
                               "at most 256")]:
            with pytest.raises(SnapdError, match=words):
                conn.call("snapshot", **{**base, **fields})
        req = conn.send("snapshot", **base, inline="AACAPw==")  # 1.0 as float32
        assert conn.wait(req, 10)["type"] == "copied" and conn.wait(req, 30)["type"] == "persisted"
    finally:
        conn.close()
    assert float(snapd.load(daemon.root, "badinline")) == 1.0  # (the tree is the tensor itself)
