"""Property-based fuzzing of the protocol against a live daemon: every message,
however malformed, gets an answer (an error with a code, or a legitimate
reply), and the daemon keeps serving a real client afterwards."""

import json
import os

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapd.client as snapd
from snapd import protocol

REPLY_TYPES = {"error", "welcome", "granted", "copied", "status", "pong", "bye", "released", "persisted"}
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
fields = st.dictionaries(st.sampled_from(["job", "pid", "nbytes", "emergency", "lease", "step", "metrics", "tree",
                                          "tensors", "layout", "values", "inline", "on_busy", "keep_last", "best",
                                          "root"]), json_values)


@pytest.fixture(scope="module")
def live(module_daemon):
    d = module_daemon
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    yield d, sock
    sock.close()


def _exchange(sock: zmq.Socket, frames: list[bytes]) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(5000), "the daemon did not answer"
    reply = protocol.decode_reply(sock.recv())
    assert reply["type"] in REPLY_TYPES
    if reply["type"] == "error":
        assert reply["code"] and reply["message"]
    return reply


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.binary(max_size=300))
def test_random_bytes(live, frame) -> None:
    _exchange(live[1], [frame])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(protocol.REQUESTS) + ["launch", ""]), body=fields,
       req_id=st.integers(-5, 2**64), version=st.sampled_from([1, 1, 1, 0, 2, "1", None]))
def test_structured_but_wrong(live, kind, body, req_id, version) -> None:
    frame = json.dumps({"v": version, "type": kind, "id": req_id, **body}).encode()
    _exchange(live[1], [frame])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=50), min_size=2, max_size=4))
def test_multi_frame_messages(live, frames) -> None:
    assert _exchange(live[1], frames)["code"] == "malformed"


def test_daemon_still_serves_after_fuzzing(live) -> None:
    d, sock = live
    # the fuzzer may hold leases under its hello; say bye so its buffers come back
    _exchange(sock, [protocol.request("bye", 1)])
    assert d.proc.poll() is None
    with snapd.connect("after-fuzz", endpoint=d.endpoint, spawn=False) as c:
        info = c.snapshot({"w": np.arange(1000.0)}, step=1).wait(30)
    assert np.array_equal(snapd.load(d.root, "after-fuzz")["w"], np.arange(1000.0))
    assert info.path.parent.parent == d.root and sorted(os.listdir(d.root)) == ["after-fuzz"]
