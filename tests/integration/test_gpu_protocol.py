"""The GPU path's messages against a daemon without CUDA (every CI run): a descriptor naming a
device the daemon cannot reach is refused with a clear error, the lease goes back, and the
daemon keeps serving; malformed GPU fields are refused before anything is touched."""

import os

import numpy as np

import snapd.client as snapd
from snapd.client.connection import Connection
from snapd.errors import SnapdError


def _snapshot(conn: Connection, lease: int, cuda: dict, **extra) -> None:
    conn.call("snapshot", lease=lease, step=1, metrics={}, emergency=False, tree={"t": "tensor", "i": 0},
              layout=1, tensors=[{"key": "w", "kind": "torch", "dtype": "float32", "shape": [4], "offset": 0,
                        "nbytes": 16, "cuda": cuda}], **extra)


def test_gpu_descriptors_to_a_cpu_daemon(daemon) -> None:
    conn = Connection(daemon.endpoint, 5.0)
    try:
        welcome = conn.call("hello", job="g", pid=os.getpid(), keep_last=1, keep_every_steps=None, best=None,
                            on_busy="wait", root=None)
        assert welcome["cuda"]["devices"] == []  # the client then stages device tensors itself
        good = {"dev": "GPU-00000000-0000-0000-0000-000000000000", "handle": "ab" * 64, "offset": 0,
                "size": 16}
        for cuda, extra, words in [
            (good, {}, "cannot reach CUDA device GPU-00000000"),
            ({**good, "handle": "xy" * 64}, {}, "128 lowercase hex digits"),
            ({**good, "offset": 8}, {}, "outside the 16-byte allocation"),
            (good, {"ready_events": {"GPU-0": "zz"}}, "128 lowercase hex digits"),
        ]:
            lease = conn.call("acquire", nbytes=16, emergency=False)["lease"]
            try:
                _snapshot(conn, lease, cuda, **extra)
                raise AssertionError("accepted")
            except SnapdError as e:
                assert words in str(e), e
            try:  # refused while reading the message: the lease is still ours; refused after: given back
                conn.call("release", lease=lease)
            except SnapdError as e:
                assert "is not yours" in str(e), e
        assert conn.call("status")["buffers"]["busy"] == 0  # refused snapshots gave their buffers back
    finally:
        conn.close()
    with snapd.connect("after", endpoint=daemon.endpoint, spawn=False) as c:  # still serving
        w = np.arange(10, dtype=np.float32)
        c.snapshot({"w": w}, step=1).wait()
        assert np.array_equal(c.restore()["w"], w)
