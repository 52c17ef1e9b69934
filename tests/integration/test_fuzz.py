"""Property-based fuzzing of the protocol against a live daemon: every message, however malformed,
gets an answer (an error with a code, or a legitimate reply), before a session and inside an
established one, for every message type; and the daemon keeps serving a real client afterwards."""

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapd.client as snapd
from snapd import protocol
from snapd.cli import main as cli

# every type of message the daemon sends (test_the_fuzzers_reply_types_are_all_the_daemons keeps it so)
REPLY_TYPES = {"error", "welcome", "granted", "received", "copied", "queued", "persisted", "status", "pong",
               "bye", "released", "registered", "synced", "waiting", "located", "fetched", "peers_known",
               "noted", "removed"}
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                               max_size=4),
                           max_leaves=12)
fields = st.dictionaries(st.sampled_from(["job", "pid", "nbytes", "emergency", "lease", "step", "metrics",
                                          "tree",
                                          "tensors", "layout", "values", "inline", "on_busy", "keep_last",
                                          "best", "root", "peers", "complete"]), json_values)


@pytest.fixture(scope="module")
def live(module_daemon):
    d = module_daemon
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    yield d, sock
    sock.close()


def _check(reply: dict) -> dict:
    assert reply["type"] in REPLY_TYPES, reply
    if reply["type"] == "error":
        assert reply["code"] and reply["message"], reply
    return reply


def _exchange(sock: zmq.Socket, frames: list[bytes]) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(5000), "the daemon did not answer"
    return _check(protocol.decode_reply(sock.recv()))


def _answer(sock: zmq.Socket, frame: bytes, req_id: int) -> dict:
    """Send ``frame``; the first reply to ``req_id`` (``waiting`` counts: the grant or refusal comes
    later). Replies to earlier requests (a snapshot's ``persisted``) are checked on the way."""
    sock.send(frame)
    while True:
        assert sock.poll(10_000), f"the daemon did not answer request {req_id}"
        reply = _check(protocol.decode_reply(sock.recv()))
        if reply["id"] == req_id:
            return reply


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.binary(max_size=300))
def test_random_bytes(live, frame) -> None:
    _exchange(live[1], [frame])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(protocol.REQUESTS) + ["launch", ""]), body=fields,
       req_id=st.integers(-5, 2**64),
       version=st.sampled_from([protocol.PROTOCOL_VERSION] * 3 + [0, 1, "2", None]))
def test_structured_but_wrong(live, kind, body, req_id, version) -> None:
    frame = json.dumps({"v": version, "type": kind, "id": req_id, **body}).encode()
    _exchange(live[1], [frame])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=50), min_size=2, max_size=4))
def test_multi_frame_messages(live, frames) -> None:
    assert _exchange(live[1], frames)["code"] == "malformed"


_W = base64.b64encode(bytes(16)).decode()
_TENSOR = {"key": "w", "kind": "numpy", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16,
           "inline": True}
# a valid request of each type, inside a session (the fuzzer mutates them)
VALID = {
    "hello": {"job": "fuzz", "pid": os.getpid(), "on_busy": "skip", "notices": True},
    "acquire": {"nbytes": 64, "emergency": False},
    "snapshot": {"nbytes": 16, "step": 1, "metrics": {"loss": 0.5}, "emergency": False, "layout": 1,
                 "tensors": [_TENSOR], "tree": {"t": "dict", "k": ["w"], "v": [{"t": "tensor", "i": 0}]},
                 "inline": _W},
    "snapshot_again": {"nbytes": 16, "step": 2, "metrics": {}, "emergency": False, "layout": 1, "inline": _W,
                       "changes": []},
    "release": {"lease": 1}, "register": {"path": f"/dev/shm/snapd-client-{os.getpid()}-fuzz", "bytes": 4096},
    "status": {}, "ping": {}, "sync": {}, "bye": {}, "preempt": {"deadline_s": 1.5}, "remove": {"step": 1},
}


@st.composite
def mutated(draw) -> tuple[str, dict]:
    """A valid request of some type with some fields dropped, replaced by any JSON, or added."""
    name = draw(st.sampled_from(sorted(VALID)))
    body = {}
    for field, value in VALID[name].items():
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "replace"]))
        if action != "drop":
            body[field] = value if action == "keep" else draw(json_values)
    body.update(draw(st.dictionaries(st.sampled_from(["lease", "layout", "values", "changes", "ready_events",
                                                      "cuda_devices", "root", "best", "x"]), json_values,
                                     max_size=2)))
    return name.removesuffix("_again"), body


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=mutated())
def test_every_type_mutated_inside_a_session(live, request) -> None:
    """Past ``hello`` (which random text never gets through): a fresh session, a snapshot that
    defines layout 1, then the mutated request; the session ends with ``bye`` (its leases and
    waits go back)."""
    sock = live[1]
    kind, body = request
    welcome = _answer(sock, protocol.message("hello", 1, **VALID["hello"]), 1)
    assert welcome["type"] == "welcome", welcome
    _answer(sock, protocol.message("snapshot", 2, **VALID["snapshot"]), 2)
    # (inf: not JSON)
    frame = json.dumps({"v": protocol.PROTOCOL_VERSION, "type": kind, "id": 3, **body}).encode()
    _answer(sock, frame, 3)
    assert _answer(sock, protocol.message("ping", 4), 4)["type"] == "pong"
    assert _answer(sock, protocol.message("bye", 5), 5)["type"] == "bye"


def test_the_fuzzers_reply_types_are_all_the_daemons() -> None:
    source = "".join(p.read_text() for p in (Path(snapd.__file__).parents[1] / "daemon").glob("*.py"))
    sent = set(re.findall(r'protocol\.message\(\s*"(\w+)"', source)) | {"error", "received", "copied"}
    # (answered off the server thread: snapd.daemon.channels.OffThread)
    sent |= set(re.findall(r'(?:_off_thread|_answers\.start)\(peer, req_id, "(\w+)"', source))
    assert sent == REPLY_TYPES


def test_daemon_still_serves_after_fuzzing(live) -> None:
    d, sock = live
    # the fuzzer may hold leases under its hello; say bye so its buffers come back
    _exchange(sock, [protocol.message("bye", 1)])
    assert d.proc.poll() is None
    with snapd.connect("after-fuzz", endpoint=d.endpoint, spawn=False) as c:
        info = c.snapshot({"w": np.arange(1000.0)}, step=1).wait(30)
    assert np.array_equal(snapd.load(d.root, "after-fuzz")["w"], np.arange(1000.0))
    # nothing written outside the two jobs' directories, and every snapshot the fuzzer got through is whole
    written = sorted(n for n in os.listdir(d.root) if not n.startswith(".snapd-disk-probe-"))
    assert info.path.parent.parent == d.root and written == ["after-fuzz", "fuzz"]
    assert cli(["verify", str(d.root)]) == 0
