"""One client must not hurt the daemon or the others: every hostile request gets a clear error
(or its snapshot fails, naming why), and the daemon goes on serving a well-behaved client."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

import snapd.client as snapd
from snapd import protocol
from snapd.errors import DaemonUnavailable, InvalidArgument


class Raw:
    """A client that speaks the protocol by hand, over a real socket."""

    def __init__(self, endpoint: str, job: str = "raw") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = iter(range(1, 1 << 30))
        self.call("hello", job=job, pid=os.getpid(), keep_last=None, keep_every_steps=None, best=None,
                  on_busy="wait", root=None)

    def send_frame(self, frame: bytes, timeout_s: float = 10.0) -> dict:
        self.sock.send(frame)
        assert self.sock.poll(int(timeout_s * 1000)), "the daemon did not answer"
        return protocol.decode_reply(self.sock.recv())

    def call(self, kind: str, timeout_s: float = 10.0, **fields) -> dict:
        return self.send_frame(protocol.message(kind, next(self.ids), **fields), timeout_s)

    def close(self) -> None:
        self.sock.close()


def _serves_others(d) -> None:
    """A well-behaved client still snapshots and restores, bit-exact."""
    w = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
    with snapd.connect("good", endpoint=d.endpoint, spawn=False, timeout_s=10) as c:
        c.snapshot({"w": w}, step=1).wait(timeout=60)
        assert np.array_equal(c.restore("latest")["w"], w)
    assert d.proc.poll() is None


def test_a_fifo_named_like_a_region_is_refused_without_blocking(daemon) -> None:
    fifo = f"/dev/shm/snapd-client-{os.getpid()}-f1f0"
    os.mkfifo(fifo, 0o600)
    try:
        raw = Raw(daemon.endpoint)
        reply = raw.call("register", path=fifo, bytes=4096, timeout_s=5)
        assert reply["type"] == "error" and reply["code"] == "bad_region" \
                and "regular file" in reply["message"]
        assert raw.call("ping")["type"] == "pong"
        raw.close()
    finally:
        os.unlink(fifo)
    _serves_others(daemon)


@pytest.mark.parametrize("kind", ["directory", "symlink", "socket"])
def test_other_special_files_are_refused_as_regions(daemon, tmp_path, kind) -> None:
    path = f"/dev/shm/snapd-client-{os.getpid()}-5bec"
    if kind == "directory":
        os.mkdir(path)
    elif kind == "symlink":
        os.symlink("/etc/passwd", path)
    else:
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
    try:
        raw = Raw(daemon.endpoint)
        reply = raw.call("register", path=path, bytes=4096, timeout_s=5)
        assert reply["type"] == "error" and reply["code"] == "bad_region"
        raw.close()
    finally:
        os.rmdir(path) if kind == "directory" else os.unlink(path)
    _serves_others(daemon)


TRUNCATE_REGION = r"""
import glob, os, sys
import numpy as np
import snapd.client as snapd
state = {"w": np.arange(4 << 20, dtype=np.float32)}
with snapd.connect("victim", endpoint=sys.argv[1], spawn=False, timeout_s=10) as c:
    c.share(state)
    (region,) = glob.glob(f"/dev/shm/snapd-client-{os.getpid()}-*")
    os.truncate(region, 4096)  # the region is now far shorter than registered
    try:
        c.snapshot(state, step=1).wait(timeout=60)
        print("PERSISTED")
    except Exception as e:
        print("FAILED", type(e).__name__, e)
"""


def test_a_region_truncated_after_registration_fails_that_snapshot_only(daemon, client_proc) -> None:
    out = client_proc(TRUNCATE_REGION, daemon.endpoint)
    assert "FAILED" in out.stdout and "truncated" in out.stdout, out.stdout + out.stderr + daemon.log_text()
    assert daemon.proc.poll() is None, daemon.log_text()
    _serves_others(daemon)


TRUNCATE_BUFFER = r"""
import os, sys
import numpy as np
import snapd.client as snapd
from snapd.client import host_buffers
real_copy = host_buffers.HostBuffers.copy
real_map = host_buffers.HostBuffers.mapping
paths = []
def mapping(self, path, *a, **kw):
    paths.append(path)
    return real_map(self, path, *a, **kw)
def copy(self, buf, *a, **kw):
    real_copy(self, buf, *a, **kw)
    os.truncate(paths[-1], 0)  # holding the lease: cut the daemon's buffer short
host_buffers.HostBuffers.mapping, host_buffers.HostBuffers.copy = mapping, copy
state = {"w": np.arange(4 << 20, dtype=np.float32), "b": np.ones(3, np.int8)}
with snapd.connect("victim", endpoint=sys.argv[1], spawn=False, timeout_s=10) as c:
    try:
        c.snapshot(state, step=1).wait(timeout=60)
        print("PERSISTED")
    except Exception as e:
        print("FAILED", type(e).__name__, e)
"""


def test_a_host_buffer_truncated_by_its_client_fails_that_snapshot_only(daemon, client_proc) -> None:
    out = client_proc(TRUNCATE_BUFFER, daemon.endpoint)
    assert "FAILED" in out.stdout and "truncated" in out.stdout, out.stdout + out.stderr + daemon.log_text()
    assert daemon.proc.poll() is None, daemon.log_text()
    _serves_others(daemon)


def test_deeply_nested_json_is_a_bad_request_logged_once(daemon) -> None:
    raw = Raw(daemon.endpoint)
    deep = b'{"v": 1, "id": 5, "type": "ping", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for _ in range(3):
        reply = raw.send_frame(deep)
        assert reply["type"] == "error" and reply["code"] == "malformed" and "deep" in reply["message"]
    tree = {"t": "list", "v": []}
    node = tree
    for _ in range(450):  # parses, but nests past what the tree checks allow
        child = {"t": "list", "v": []}
        node["v"].append(child)
        node = child
    frame = json.dumps({"v": protocol.PROTOCOL_VERSION, "id": 9, "type": "snapshot", "nbytes": 0, "step": 1,
                        "metrics": {}, "emergency": False, "layout": 1, "tensors": [], "tree": tree}).encode()
    reply = raw.send_frame(frame)
    assert reply["type"] == "error" and reply["code"] in ("malformed", "bad_field")
    assert raw.call("ping")["type"] == "pong"
    raw.close()
    log = daemon.log_text()
    assert "Traceback" not in log and "internal error" not in log
    _serves_others(daemon)


def test_a_client_hoarding_leases_cannot_starve_another(start) -> None:
    d = start("--max-host-memory-bytes", str(160 << 20))  # room for five 32 MiB buffers, no more
    hoarder = Raw(d.endpoint, "hoard")
    grants = [hoarder.call("acquire", nbytes=32 << 20, emergency=False, timeout_s=5) for _ in range(4)]
    assert all(g["type"] == "granted" for g in grants)
    # over its limit: waits
    hoarder.sock.send(protocol.message("acquire", 99, nbytes=32 << 20, emergency=False))
    assert not hoarder.sock.poll(1000)
    _serves_others(d)  # the fifth buffer is the other client's
    hoarder.close()


def test_a_wait_for_a_buffer_is_bounded_and_reported(start, tmp_path, caplog) -> None:
    (tmp_path / "snapd.toml").write_text("busy_wait_s = 3\nclient_max_in_flight = 4\n")
    d = start("--max-host-memory-bytes", str(64 << 20), "--config", str(tmp_path / "snapd.toml"))
    hoarder = Raw(d.endpoint, "hoard")
    for _ in range(2):
        assert hoarder.call("acquire", nbytes=1 << 20, emergency=False, timeout_s=2)["type"] == "granted"
    with snapd.connect("starved", endpoint=d.endpoint, spawn=False, timeout_s=10) as c:
        t = time.monotonic()
        p = c.snapshot({"w": np.ones(1000, np.float32)}, step=1)
        assert p.skipped and "busy_wait_s" in p.reason and f"pid {os.getpid()}" in p.reason
        assert time.monotonic() - t < 30
    told = [r.getMessage() for r in caplog.records if "waits for a host buffer" in r.getMessage()]
    assert told and "every host buffer is busy" in told[0] and "at most 3 s" in told[0], told
    assert "waiting for a host buffer (busy_wait_s); held: pid" in d.log_text()
    hoarder.close()


def test_daemon_unavailable_within_timeout_s(daemon) -> None:
    c = snapd.connect("stopped", endpoint=daemon.endpoint, spawn=False, timeout_s=2)
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            c.snapshot({"w": np.ones(10, np.float32)}, step=1).wait()
        took = time.monotonic() - t
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert took < 2 * 1.5, f"DaemonUnavailable after {took:.1f} s with timeout_s=2"
    c.close()


def test_startup_removes_what_a_killed_daemon_and_dead_trainers_left(tmp_path, start) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job = tmp_path / "root" / "j"
    (job / f".tmp-5-{dead.pid}-abcd1234").mkdir(parents=True)
    (job / f".tmp-5-{dead.pid}-abcd1234" / "data-00000.bin").write_bytes(b"x" * 4096)
    (job / ".lock").touch()
    alive = job / f".tmp-6-{os.getpid()}-abcd1234"  # a live writer's: kept
    alive.mkdir()
    region = f"/dev/shm/snapd-client-{dead.pid}-0bad"
    open(region, "wb").close()
    start()
    assert not (job / f".tmp-5-{dead.pid}-abcd1234").exists()
    assert alive.exists()
    assert not os.path.exists(region)


@pytest.mark.parametrize("endpoint", ["localhost:5555", "ipc://", "/tmp/x.sock", "tcp://127.0.0.1:1",
                                      "ipc://@abstract"])
def test_a_malformed_endpoint_is_one_clear_error(endpoint) -> None:
    with pytest.raises(InvalidArgument, match="ipc://PATH"):
        snapd.connect("j", endpoint=endpoint, spawn=False)
    out = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", endpoint],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "ipc://PATH" in out.stderr
    out = subprocess.run([sys.executable, "-m", "snapd", "status"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SNAPD_ENDPOINT": endpoint}, cwd="/")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "ipc://PATH" in out.stderr


def test_a_socket_path_too_long_for_unix_sockets_is_one_clear_error(tmp_path) -> None:
    """ZeroMQ would only say "File name too long" (or a spawned daemon would die with it)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    endpoint = f"ipc://{deep}/snapd.sock"
    with pytest.raises(InvalidArgument, match="at most 107"):
        snapd.connect("j", endpoint=endpoint, root=str(tmp_path / "root"))
    for cmd in (["status", "--endpoint", endpoint],
                ["serve", "--endpoint", endpoint, "--root", str(tmp_path / "root")]):
        out = subprocess.run([sys.executable, "-m", "snapd", *cmd], capture_output=True, text=True,
                             timeout=60, cwd="/")
        assert out.returncode != 0 and "Traceback" not in out.stderr and "at most 107" in out.stderr, cmd
    assert not deep.exists() and not (tmp_path / "root").exists()  # (nothing made for it)


def test_a_relative_endpoint_with_spawn_works_from_the_callers_directory(tmp_path, client_proc) -> None:
    code = ("import os, sys, numpy as np, snapd.client as snapd\nos.chdir(sys.argv[1])\nwith "
            "snapd.connect('rel', endpoint='ipc://d.sock', root=sys.argv[1] + '/root', timeout_s=20) as "
            "c:\n    c.snapshot({'w': np.ones(4)}, step=1).wait(timeout=60)\n    print('OK', "
            "c.restore()['w'].sum())\n")
    out = client_proc(code, str(tmp_path))
    assert "OK 4.0" in out.stdout, out.stdout + out.stderr
    assert not os.path.exists("/d.sock")
