"""The daemon and its client, each a real process, over a real ZeroMQ socket."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

import snapd.client as snapd
from snapd import protocol
from snapd.cli import main as cli
from snapd.errors import Busy, DaemonUnavailable, InvalidArgument


def _state(seed: int, mib: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    return {"model": {"w": (rng.standard_normal(mib << 18) * 0.02).astype(np.float32),
                      "t": torch.from_numpy(rng.standard_normal(1000).astype(np.float32)).to(torch.bfloat16)},
            "optim": {"state": {0: {"step": torch.tensor(seed)}}, "param_groups": [{"lr": 1e-3}]},
            "seed": seed, "ids": np.arange(seed, seed + 100)}


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_round_trip_bit_exact_and_state_changes_after_return(daemon) -> None:
    import copy

    with snapd.connect("exact", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        pendings, saved = [], {}
        state = _state(0)
        for step in range(4):
            pendings.append((step, c.snapshot(state, step=step, metrics={"loss": 1.0 / (step + 1)})))
            saved[step] = copy.deepcopy(state)
            state["model"]["w"] += 1  # the trainer changes its tensors right after snapshot() returns
            state["model"]["t"].add_(1)
            state["seed"] = step + 1
        for step, p in pendings:
            info = p.wait(timeout=60)
            assert info.step == step and info.path.is_dir()
        for step in range(4):
            assert _equal(c.restore(step), saved[step]), step
        assert [s.step for s in c.list()] == [0, 1, 2, 3]
    assert cli(["verify", str(daemon.root / "exact")]) == 0


def test_snapshot_while_the_daemon_still_faults_its_buffers_in(start) -> None:
    """A new daemon faults its host buffers in on a thread (about 1.3 GB/s); a snapshot that comes
    meanwhile must keep every byte (that thread once wrote a zero to each page, over the first
    byte of pages a client had just filled)."""
    from snapd.client.connection import Connection

    d = start("--host-buffer-bytes", str(512 << 20), "--codec", "raw")
    holder = Connection(d.endpoint, 5.0)  # holds the first buffer: the snapshot gets the one faulted in last
    holder.call("hello", job="holder", pid=os.getpid(), keep_last=1, keep_every_steps=None, best=None,
                on_busy="wait", root=None)
    holder.call("acquire", nbytes=64, emergency=False)
    ones = np.full(384 << 20, 0xFF, np.uint8)
    try:
        with snapd.connect("early", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
            c.snapshot({"w": ones}, step=0).wait(60)
            got = c.restore(0)["w"]
    finally:
        holder.close()
    bad = np.flatnonzero(got != 0xFF)
    assert bad.size == 0, f"{bad.size} bytes lost, first at offsets {bad[:5].tolist()}"


def test_two_jobs_from_two_processes(daemon, client_proc) -> None:
    code = ("import sys, numpy as np, snapd.client as c\n"
            "cl = c.connect(sys.argv[2], endpoint=sys.argv[1], spawn=False, keep_last=None)\n"
            "ps = [cl.snapshot({'w': np.full(1 << 20, s, np.float32), 's': s}, step=s) for s in range(6)]\n"
            "[p.wait(60) for p in ps]\ncl.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, daemon.endpoint, job], cwd="/") for job in ("a",
                                                                                                       "b")]
    assert [p.wait(120) for p in procs] == [0, 0], daemon.log_text()
    for job in ("a", "b"):
        assert [s.step for s in snapd.list_snapshots(daemon.root, job)] == list(range(6))
        assert snapd.load(daemon.root, job, 5)["w"][0] == 5


def test_trainer_sigkilled_after_copied_is_persisted(daemon, client_proc) -> None:
    code = ("import os, signal, sys, numpy as np, snapd.client as c\n"
            "cl = c.connect('killed', endpoint=sys.argv[1], spawn=False)\nrng = np.random.default_rng(7)\n"
            "cl.snapshot({'w': rng.standard_normal(6 << 20).astype(np.float32)}, step=42)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = client_proc(code, daemon.endpoint)
    assert out.returncode == -signal.SIGKILL, out.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (daemon.root / "killed" / "step-000000000042").exists():
        time.sleep(0.1)
    got = snapd.load(daemon.root, "killed", 42)["w"]
    assert np.array_equal(got, np.random.default_rng(7).standard_normal(6 << 20).astype(np.float32))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_what_was_copied(start, client_proc, sig) -> None:
    """(SIGHUP too: a daemon started from a shell whose terminal closes; it died at once.)"""
    d = start("--codec", "shuffle-zstd")
    code = ("import sys, numpy as np, snapd.client as c\n"
            "cl = c.connect('drain', endpoint=sys.argv[1], spawn=False, keep_last=None)\nfor s in range(2):\n"
            "    cl.snapshot({'w': np.random.default_rng(s).standard_normal(7 << 20).astype(np.float32)}, "
            "step=s)\nprint('copied', flush=True)\n")
    out = client_proc(code, d.endpoint)
    assert out.stdout.strip() == "copied", out.stderr
    assert d.stop(sig) == 0, d.log_text()
    assert [s.step for s in snapd.list_snapshots(d.root, "drain")] == [0, 1]
    assert "drained" in d.log_text()


def test_daemon_sigkill_mid_flush_keeps_older_snapshots(start, tmp_path) -> None:
    """Killed at the last moment of a commit (tests/integration/scripts/faulty_daemon.py pauses the
    flush there: data and manifest written and synced, not yet renamed into place)."""
    paused = [sys.executable, str(Path(__file__).parent / "scripts" / "faulty_daemon.py"), "install", "2"]
    d = start("--codec", "shuffle-zstd", "--host-buffer-bytes", str(64 << 20), command=paused)
    c = snapd.connect("crash", endpoint=d.endpoint, spawn=False, keep_last=None)
    c.snapshot({"w": np.ones(1000, np.float32)}, step=1).wait(30)
    big = {f"w{i}": np.random.default_rng(i).standard_normal(2 << 20).astype(np.float32) for i in range(4)}
    c.snapshot(big, step=2)
    d.wait_for(lambda: "paused before installing step 2" in d.log_text(), timeout=60)
    [tmp] = [p for p in (d.root / "crash").iterdir() if p.name.startswith(".tmp-2-")]
    assert (tmp / "manifest.json").exists()  # (the most a commit can have done and still not be there)
    d.proc.kill()
    d.proc.wait()
    assert [s.step for s in snapd.list_snapshots(d.root, "crash")] == [1]
    with pytest.raises(DaemonUnavailable):
        c.snapshot({"w": np.ones(3)}, step=3)
    c.close()
    d2 = start(endpoint=d.endpoint, root=d.root, name="d2")  # replaces the stale socket
    with snapd.connect("crash", endpoint=d2.endpoint, spawn=False) as c2:
        c2.snapshot({"w": np.ones(3)}, step=3).wait(30)
    assert [s.step for s in snapd.list_snapshots(d.root, "crash")] == [1, 3]
    assert not [p for p in (d.root / "crash").iterdir() if p.name.startswith((".tmp", ".trash"))]
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"snapd-{d.proc.pid}-")]


@pytest.mark.parametrize("job", ["../evil", "/abs", "a/b", "..", "x" * 200, "nul\x00"])
def test_hostile_job_names_refused_and_daemon_keeps_serving(daemon, job) -> None:
    with pytest.raises(InvalidArgument, match="invalid job name"):
        snapd.connect(job, endpoint=daemon.endpoint, spawn=False)
    with snapd.connect("fine", endpoint=daemon.endpoint, spawn=False) as c:
        c.snapshot({"w": np.ones(2)}, step=1).wait(30)
    # (the daemon's disk probe at start may still have its file there, on a busy machine)
    assert sorted(n for n in os.listdir(daemon.root) if not n.startswith(".snapd-disk-probe-")) == ["fine"]


def test_emergency_dump_under_a_real_signal(daemon, client_proc) -> None:
    code = ("import os, signal, sys, time, numpy as np, snapd.client as c\n"
            "cl = c.connect('preempt', endpoint=sys.argv[1], spawn=False)\n"
            "state = {'w': np.arange(1 << 20, dtype=np.float32), 'step': 0}\n"
            "cl.on_preemption(lambda: (state, state['step']), deadline_s=20)\nfor step in range(1, 1000):\n"
            "    state['w'] += 1; state['step'] = step\n"
            "    if step == 5: os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(0.01)\n"
            "print('not terminated')\n")
    out = client_proc(code, daemon.endpoint)
    assert out.returncode == -signal.SIGTERM, out.stdout + out.stderr  # chained to the default action
    infos = snapd.list_snapshots(daemon.root, "preempt")
    assert [(s.step, s.emergency) for s in infos] == [(5, True)]
    assert snapd.load(daemon.root, "preempt")["w"][0] == 5


def test_daemon_gone_raises_within_timeout(start) -> None:
    d = start()
    c = snapd.connect("gone", endpoint=d.endpoint, spawn=False, timeout_s=1.0)
    d.proc.kill()
    d.proc.wait()
    t = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        c.snapshot({"w": np.ones(3)}, step=1)
    assert time.monotonic() - t < 10
    c.close()
    with pytest.raises(DaemonUnavailable, match="no snapd answers"):
        snapd.connect("gone", endpoint=d.endpoint, spawn=False, timeout_s=0.5)


def _raw(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _ask(s: zmq.Socket, frame: bytes) -> dict:
    s.send(frame)
    assert s.poll(5000), "the daemon did not answer"
    return protocol.decode_reply(s.recv())


def test_busy_buffers_skip_or_wait(start) -> None:
    daemon = start("--max-host-memory-bytes", str(64 << 20))  # a fixed pool: two buffers, no more
    holder = _ask_hello(daemon.endpoint)
    leases = [_ask(holder, protocol.message("acquire", i + 2, nbytes=1024, emergency=False))["lease"]
              for i in range(2)]  # both host buffers held
    with snapd.connect("skipper", endpoint=daemon.endpoint, spawn=False, on_busy="skip") as c:
        p = c.snapshot({"w": np.ones(4)}, step=1)
        assert p.skipped and "busy" in p.reason
        with pytest.raises(Busy):
            p.wait()
    with snapd.connect("waiter", endpoint=daemon.endpoint, spawn=False, on_busy="wait") as c:
        # (the release is timed from here, not before the connect: a loaded machine's connect took 0.2 s+)
        threading.Timer(0.5, lambda: holder.send(protocol.message("release", 9, lease=leases[0]))).start()
        p = c.snapshot({"w": np.ones(4)}, step=1)
        assert not p.skipped and p.waited_s >= 0.3
        p.wait(30)
    holder.close()


def _ask_hello(endpoint: str) -> zmq.Socket:
    s = _raw(endpoint)
    assert _ask(s,
                protocol.message("hello", 1, job="holder", pid=os.getpid(),
                                 on_busy="wait"))["type"] == "welcome"
    return s


def test_bad_requests_get_coded_errors(daemon) -> None:
    s = _raw(daemon.endpoint)
    cases = [(b"not json", "malformed"), (b"[1]", "malformed"),
             (b'{"v": 9, "id": 1, "type": "ping"}', "version"),
             (protocol.message("launch", 1), "unknown_type"),
             (protocol.message("acquire", 1, nbytes=10, emergency=False), "out_of_order"),
             (protocol.message("hello", 1, job="../x", pid=1, on_busy="wait"), "invalid_argument"),
             (protocol.message("hello", 1, job="ok", pid="me", on_busy="wait"), "bad_field")]
    for frame, code in cases:
        r = _ask(s, frame)
        assert r["type"] == "error" and r["code"] == code, (frame, r)
    _ask(s, protocol.message("hello", 2, job="ok", pid=os.getpid(), on_busy="wait"))
    r = _ask(s, protocol.message("acquire", 3, nbytes=1 << 40, emergency=False))
    assert r["code"] == "too_large" and "host_buffer_bytes" in r["message"]
    lease = _ask(s, protocol.message("acquire", 4, nbytes=100, emergency=False))["lease"]
    bad = {"key": "w", "kind": "numpy", "dtype": "float32", "shape": [10], "offset": (32 << 20) - 8,
           "nbytes": 40}
    r = _ask(s, protocol.message("snapshot", 5, lease=lease, step=1, metrics={}, emergency=False,
                                 tree={"t": "tensor", "i": 0}, layout=1, tensors=[bad]))
    assert r["code"] == "bad_field" and "outside" in r["message"]
    r = _ask(s, protocol.message("snapshot", 6, lease=lease, step=1, metrics={}, emergency=False,
                                 tree={"t": "tensor", "i": 0}, layout=1, tensors=[]))
    assert r["code"] == "bad_lease"  # the refused snapshot gave its buffer back
    assert _ask(s, protocol.message("ping", 7))["type"] == "pong"
    s.close()


def test_second_daemon_on_same_endpoint_refused(daemon) -> None:
    out = subprocess.run([sys.executable, "-m", "snapd", "serve", "--root", str(daemon.root), "--endpoint",
                          daemon.endpoint, "--host-buffer-bytes",
                          str(8 << 20)], capture_output=True, text=True,
                         timeout=30, cwd="/")
    assert out.returncode == 2 and f"already serves {daemon.endpoint}" in out.stderr
    assert snapd.connect("still", endpoint=daemon.endpoint, spawn=False).status()["pid"] == daemon.proc.pid


def test_spawn_starts_a_private_daemon(tmp_path, client_proc) -> None:
    endpoint = f"ipc://{tmp_path}/private.sock"
    code = ("import sys, numpy as np, snapd.client as c\n"
            "cl = c.connect('spawned', endpoint=sys.argv[1], root=sys.argv[2], host_buffer_bytes=16 << 20)\n"
            "print(cl.snapshot({'w': np.ones(10)}, step=1).wait(30).path)\nprint(cl.status()['pid'])\n")
    out = client_proc(code, endpoint, str(tmp_path / "root"))
    assert out.returncode == 0, out.stderr
    path, pid = out.stdout.split()
    assert path.endswith("spawned/step-000000000001")
    os.kill(int(pid), signal.SIGTERM)  # it outlived its client; stop it now
    assert (tmp_path / "root" / "spawned" / "step-000000000001" / "manifest.json").exists()


def test_ranks_that_spawn_at_once_share_the_one_daemon_that_wins(tmp_path) -> None:
    """The ranks of a job on one node connect at the same moment, each spawning a private daemon:
    one wins the endpoint, and the others use it (they once failed with "another snapd serves")."""
    endpoint = f"ipc://{tmp_path}/private.sock"
    code = ("import os, sys, time, numpy as np, snapd.client as c\n"
            "while not os.path.exists(sys.argv[4]): time.sleep(0.001)\n"  # (all at once)
            "cl = c.connect(f'raced-{sys.argv[3]}', endpoint=sys.argv[1], root=sys.argv[2],\n"
            "               host_buffer_bytes=8 << 20)\n"
            "cl.snapshot({'w': np.ones(10)}, step=1).wait(30)\nprint(cl.status()['pid'])\n")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, endpoint, str(tmp_path / "root"), str(r), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
             for r in range(4)]
    time.sleep(3)  # (every process imported snapd and waits for the start)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    pids = {o[0].strip() for o in outs}
    assert len(pids) == 1, pids  # one daemon served them all
    os.kill(int(pids.pop()), signal.SIGTERM)
    assert all((tmp_path / "root" / f"raced-{r}" / "step-000000000001" / "manifest.json").is_file()
               for r in range(4))


def test_module_level_snapshot_uses_env_job_and_endpoint(daemon) -> None:
    code = ("import numpy as np, snapd.client as c\n"
            "p = c.snapshot({'w': np.arange(5.0)}, step=9)\nprint(p.wait(30).path)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60,
                         env={**os.environ, "SNAPD_JOB": "from-env", "SNAPD_ENDPOINT": daemon.endpoint})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(daemon.root / "from-env" / "step-000000000009")


def test_failed_flush_reports_code_and_stage_and_daemon_goes_on(daemon) -> None:
    from snapd.errors import SnapshotError

    daemon.root.mkdir(exist_ok=True)
    (daemon.root / "blocked").write_text("a file where the job directory should be")
    with snapd.connect("blocked", endpoint=daemon.endpoint, spawn=False) as c:
        p = c.snapshot({"w": np.ones(8)}, step=1)
        deadline = time.monotonic() + 30
        while not p.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(SnapshotError) as e:
            p.wait(5)
        assert e.value.stage == "flush" and "cannot create job directory" in str(e.value)
        assert "blocked step 1" in c.status()["last_error"]
        (daemon.root / "blocked").unlink()
        assert c.snapshot({"w": np.ones(8)}, step=2).wait(30).step == 2


def test_a_job_whose_first_snapshot_has_no_tensor_bytes_snapshots_on(daemon) -> None:
    """(Its codec choice, made of no bytes, failed every later snapshot of the job in encode.)"""
    with snapd.connect("counters-first", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot({"step": 0, "empty": np.zeros(0, np.float32)}, step=0).wait(30)
        w = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
        for step in (1, 2):
            c.snapshot({"step": step, "w": w + step}, step=step).wait(30)
        assert np.array_equal(c.restore(2)["w"], w + 2)
        assert c.status()["counters"]["failed"] == 0
