"""kill -9 of the daemon and of the trainer at random points of a snapshot, disks full at random
sizes, hostile clients picked at random; after each, the invariants a user relies on hold:

- every snapshot listed verifies and loads bit-exact; ``latest`` is the newest one taken;
- the daemon (restarted, where it was killed) answers another client;
- nothing is left behind: no temporary directory, no shared-memory file of a dead process, no
  descriptor of a deleted file in the daemon, nothing written outside the root.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd
from snapd.cli import main as cli

_spec = importlib.util.spec_from_file_location("snapd_tests_daemons",
                                               Path(__file__).parents[1] / "integration" / "conftest.py")
daemons = sys.modules.setdefault("snapd_tests_daemons", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(daemons)  # the integration tests' real subprocess daemon (start_daemon, Daemon)

pytestmark = pytest.mark.timeout(600)

TRAINER = r"""
import sys, numpy as np, snapd.client as snapd
endpoint, steps, mib, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = np.arange(mib << 18, dtype=np.float32)
pending = []
with snapd.connect("job", endpoint=endpoint, spawn=False, keep_last=None, timeout_s=5) as c:
    state = {"w": base + 0, "tag": b"", "step": 0}
    if path == "registered":  # the daemon copies the tensors out of the trainer's region itself
        c.share(state)
    for step in range(1, steps + 1):
        if path == "registered":
            c.wait_copied()  # (the trainer's optimizer step would wait here: guard())
        state["w"][:] = base + step
        state["tag"], state["step"] = bytes([step % 256]) * 3, step
        pending.append(c.snapshot(state, step=step, emergency=step == steps))
        print(step, flush=True)
    for p in pending:  # (the tests that kill a process never get here)
        try:
            print("PERSISTED", p.wait(timeout=120).step, flush=True)
        except Exception as e:
            print("FAILED", p.step, e, flush=True)
"""


def expected(step: int, mib: int) -> dict:
    return {"w": np.arange(mib << 18, dtype=np.float32) + step, "tag": bytes([step % 256]) * 3, "step": step}


def check_invariants(d: daemons.Daemon, mib: int, dead_pids: list[int], seed: int) -> list[int]:
    """The invariants of the module docstring; returns the steps listed."""
    job = d.root / "job"
    steps: list[int] = []
    if job.exists():
        infos = snapd.list_snapshots(d.root, "job")
        steps = [s.step for s in infos]
        assert not infos or cli(["verify", str(job)]) == 0, f"seed {seed}"
        for s in infos:
            got = snapd.load(d.root, "job", step=s.step)
            want = expected(s.step, mib)
            assert np.array_equal(got["w"],
                                  want["w"]) and got["tag"] == want["tag"] and got["step"] == s.step, \
                f"seed {seed}: step {s.step} is not what was saved"
        if infos:
            assert [s.step for s in infos if s.latest] == [max(steps)], f"seed {seed}"
        assert not [p for p in job.iterdir() if p.name.startswith((".tmp", ".trash"))], f"seed {seed}"
    def left() -> list[str]:
        return [n for n in os.listdir("/dev/shm") for pid in dead_pids
                if n.startswith((f"snapd-{pid}-", f"snapd-client-{pid}-"))]
    deadline = time.monotonic() + 10  # a live daemon notices a dead trainer within client_check_interval_s
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left(), f"seed {seed}: {left()}"
    fds = Path(f"/proc/{d.proc.pid}/fd")
    deleted = [os.readlink(f) for f in fds.iterdir() if "(deleted)" in _link(f) and str(d.root) in _link(f)]
    assert not deleted, f"seed {seed}: the daemon holds deleted files {deleted}"
    w = np.full(1000, seed % 1000, np.float32)
    with snapd.connect("other", endpoint=d.endpoint, spawn=False, timeout_s=10) as c:
        c.snapshot({"w": w}, step=1).wait(timeout=60)
        assert np.array_equal(c.restore()["w"], w)
    outside = sorted(p.name for p in d.root.parent.iterdir())
    assert set(outside) <= {"root", "d.log", "d.sock", "d.sock.lock", "disk0"}, f"seed {seed}: {outside}"
    return steps


def _link(f: Path) -> str:
    try:
        return os.readlink(f)
    except OSError:
        return ""


def _trainer(d: daemons.Daemon, steps: int, mib: int, path: str = "plain") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAINER, d.endpoint, str(steps), str(mib), path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def _wait_steps(proc: subprocess.Popen, n: int) -> int:
    last = 0
    while last < n:
        line = proc.stdout.readline()
        if not line:
            break
        last = int(line)
    return last


def _start(tmp_path: Path, root: Path | None = None) -> daemons.Daemon:
    return daemons.start_daemon(tmp_path, "--host-buffer-bytes", str(16 << 20), root=root)


def test_daemon_killed_at_a_random_point_loses_nothing_committed(tmp_path, cases) -> None:
    for seed, rng in cases:
        case = tmp_path / str(seed)
        case.mkdir()
        mib, steps = rng.choice([4, 12, 24]), rng.randint(3, 6)
        d = _start(case)
        trainer = _trainer(d, steps, mib, rng.choice(["plain", "registered"]))
        _wait_steps(trainer, rng.randint(1, steps))
        time.sleep(rng.uniform(0.0, 0.8))  # during the copy, encode, flush, commit or index update
        d.proc.kill()
        d.proc.wait()
        trainer.kill()
        trainer.wait()
        again = _start(case, d.root)
        try:
            check_invariants(again, mib, [d.proc.pid, trainer.pid], seed)
        finally:
            again.stop()


def test_trainer_killed_at_a_random_point_leaves_what_it_handed_over(tmp_path, cases) -> None:
    for seed, rng in cases:
        case = tmp_path / str(seed)
        case.mkdir()
        mib, steps = rng.choice([4, 12, 24]), rng.randint(2, 6)
        d = _start(case)
        try:
            trainer = _trainer(d, steps, mib, rng.choice(["plain", "registered"]))
            handed = _wait_steps(trainer, rng.randint(1, steps))
            time.sleep(rng.uniform(0.0, 0.3))
            trainer.kill()
            trainer.wait()
            with snapd.connect("job", endpoint=d.endpoint, spawn=False, timeout_s=10) as c:
                latest = c.restore("latest")  # waits for what the dead trainer handed over
            assert latest["step"] >= handed, f"seed {seed}: handed over {handed}, latest {latest['step']}"
            check_invariants(d, mib, [trainer.pid], seed)
        finally:
            d.stop()


def test_disk_full_at_a_random_point_fails_cleanly(tmp_path, cases, small_disk) -> None:
    for seed, rng in cases:
        case = tmp_path / str(seed)
        case.mkdir()
        disk = small_disk(rng.randint(6, 40))
        mib = rng.choice([2, 4, 8])
        d = _start(case, disk / "root")
        try:
            trainer = _trainer(d, 8, mib)
            out, err = trainer.communicate(timeout=300)
            assert trainer.returncode == 0, err
            persisted = [int(line.split()[1]) for line in out.splitlines() if line.startswith("PERSISTED")]
            failed = [line for line in out.splitlines() if line.startswith("FAILED")]
            assert all("No space left on device" in line for line in failed), f"seed {seed}: {failed}"
            assert len(persisted) + len(failed) == 8, f"seed {seed}: {out}"
            steps = check_invariants_on(d, mib, seed)
            assert sorted(steps) == sorted(persisted), f"seed {seed}: told {persisted}, on disk {steps}"
        finally:
            d.stop()


def check_invariants_on(d: daemons.Daemon, mib: int, seed: int) -> list[int]:
    """As check_invariants, for a root on its own small disk (the other client's snapshot may not fit)."""
    job = d.root / "job"
    if not job.exists():
        return []
    infos = snapd.list_snapshots(d.root, "job")
    assert not infos or cli(["verify", str(job)]) == 0, f"seed {seed}"
    for s in infos:
        got = snapd.load(d.root, "job", step=s.step)
        assert np.array_equal(got["w"], expected(s.step, mib)["w"]), f"seed {seed}: step {s.step}"
    if infos:
        assert [s.step for s in infos if s.latest] == [max(s.step for s in infos)], f"seed {seed}"
    assert not [p for p in job.iterdir() if p.name.startswith((".tmp", ".trash"))], f"seed {seed}"
    with snapd.connect("other", endpoint=d.endpoint, spawn=False, timeout_s=10) as c:
        assert c._conn.call("ping")["type"] == "pong"
    return [s.step for s in infos]


HOSTILE = {
    "fifo region": "os.mkfifo(p, 0o600); print(raw('register', path=p, bytes=4096))",
    "symlink region": "os.symlink('/etc/passwd', p); print(raw('register', path=p, bytes=4096))",
    "region of a size that lies": ("open(p, 'wb').write(b'x' * 4096); "
                                   "print(raw('register', path=p, bytes=1 << 30))"),
    "region of another pid": ("q = p.replace(str(os.getpid()), '1'); "
                              "print(raw('register', path=q, bytes=4096))"),
    "lease never released": "print(raw('acquire', nbytes=1 << 20, emergency=False)); os._exit(0)",
    "deep json": "sock.send(b'[' * 200000 + b']' * 200000); print(sock.poll(5000) and sock.recv())",
    "lease of another": "print(raw('release', lease=1)); print(raw('snapshot', lease=2, step=1, metrics={}, "
                        "emergency=False, layout=1, tensors=[], tree={'t': 'dict', 'k': [], 'v': []}))",
    "huge nbytes": "print(raw('acquire', nbytes=1 << 62, emergency=False))",
    "device region": ("os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5)); "  # /dev/zero's numbers
                      "print(raw('register', path=p, bytes=4096))"),
    "socket region": ("s = socket.socket(socket.AF_UNIX); s.bind(p); print(raw('register', path=p, "
                      "bytes=4096))"),
    "region replaced after registration": ("open(p, 'wb').write(b'x' * 4096); r = raw('register', path=p, "
                                           "bytes=4096); os.unlink(p); os.symlink('/etc/shadow', p); "
                                           "print(r, raw('ping'))"),
}
HOSTILE_CLIENT = r"""
import itertools, os, socket, stat, sys, zmq
from snapd import protocol
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
ids = itertools.count(1)
def raw(kind, **f):
    sock.send(protocol.message(kind, next(ids), **f))
    return protocol.decode_reply(sock.recv()) if sock.poll(10000) else "NO ANSWER"
raw("hello", job="evil", pid=os.getpid(), keep_last=None, keep_every_steps=None, best=None, on_busy="wait",
    root=None)
p = f"/dev/shm/snapd-client-{os.getpid()}-e111"
try:
    %s
finally:
    if os.path.lexists(p):
        os.unlink(p)
"""


def test_hostile_clients_picked_at_random_leave_the_daemon_serving(tmp_path, cases) -> None:
    d = _start(tmp_path)
    try:
        for seed, rng in cases:
            names = rng.sample(sorted(HOSTILE), k=3)
            for name in names:
                out = subprocess.run([sys.executable, "-c", HOSTILE_CLIENT % HOSTILE[name], d.endpoint],
                                     capture_output=True, text=True, timeout=60, cwd="/")
                assert "NO ANSWER" not in out.stdout, f"seed {seed}, {name}: {out.stdout}{out.stderr}"
                assert d.proc.poll() is None, f"seed {seed}, {name}: the daemon died\n{d.log_text()}"
            check_invariants(d, 1, [], seed)
        assert "Traceback" not in d.log_text()
    finally:
        d.stop()
    assert d.proc.returncode == 0
