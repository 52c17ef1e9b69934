"""Through a real daemon: a daemon stopped with the job it serves (the same SIGTERM: a Slurm step of
the allocation, a node's shutdown) still takes the trainers' emergency snapshots, and waits for
nobody else. The same with a real Slurm: tests/integration/test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import snapd.client as snapd
from snapd.client.connection import Connection
from snapd.errors import SnapdError

TRAINER = r"""
import sys, time, numpy as np, snapd.client as snapd
c = snapd.connect(sys.argv[4], endpoint=sys.argv[1], spawn=False, keep_last=None)
state = {"w": np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32), "step": 1}
c.on_preemption(lambda: (state, state["step"]), deadline_s=float(sys.argv[2]))
c.snapshot(state, step=1).wait(30)
state["w"] += 1
state["step"] = 2
print("READY", flush=True)
while sys.argv[3] == "training":  # regular snapshots go on: this trainer is not being stopped
    state["step"] += 1
    try:
        c.snapshot(state, step=state["step"]).wait(30)
    except Exception as e:
        print("REFUSED", type(e).__name__, e, flush=True)
        break
time.sleep(120)
"""


def trainer(endpoint: str, deadline_s: float, mode: str = "idle", job: str = "stopped") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, endpoint, str(deadline_s), mode, job],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    return proc


@pytest.mark.parametrize("lag_s", [0.0, 0.5])
def test_a_daemon_stopped_with_the_job_takes_the_emergency_snapshot_first(start, lag_s) -> None:
    """SIGTERM to the daemon, then (``lag_s`` later, or at once) to the trainer: the daemon waited
    for nobody and exited, and the emergency snapshot found no one; now it is persisted, bit for
    bit, before the daemon exits 0."""
    d = start("--codec", "lz4")
    proc = trainer(d.endpoint, 20)
    try:
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(lag_s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
        err = proc.stderr.read()
        assert "emergency snapshot of step 2 persisted" in err, err
        assert d.proc.wait(30) == 0, d.log_text()
    finally:
        proc.kill()
        proc.wait()
    want = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32) + 1
    assert [(i.step, i.emergency) for i in snapd.list_snapshots(d.root, "stopped")] == [(1, False), (2, True)]
    assert snapd.load(d.root, "stopped", 2)["w"].tobytes() == want.tobytes()
    assert "waiting up to 20 s for the emergency snapshots of 1 client(s)" in d.log_text()


def test_the_drain_waits_for_no_client_that_is_not_being_stopped(start) -> None:
    """A daemon stopped on its own (a restart): a trainer whose regular snapshot it refuses is not
    being stopped, and is not waited for, whatever its handler's deadline; a client with no handler
    is not either; a silent one with a handler, up to its deadline only."""
    d = start("--codec", "lz4", env={"SNAPD_CLIENT_CHECK_INTERVAL_S": "0.2"})
    training = trainer(d.endpoint, 3600, "training", "training")
    silent = trainer(d.endpoint, 2, job="silent")
    bare = Connection(d.endpoint, 5)
    bare.call("hello", job="bare", pid=os.getpid(), on_busy="wait")
    try:
        assert d.stop(signal.SIGTERM, timeout=60) == 0, d.log_text()
        assert training.stdout.readline().startswith("REFUSED ShuttingDown"), training.stderr.read()
    finally:
        for p in (training, silent):
            p.kill()
            p.wait()
        bare.close()
    log = d.log_text()
    assert "waiting up to 3600 s for the emergency snapshots of 2 client(s)" in log, log
    assert "drained; exiting" in log


def test_a_scheduler_warning_leaves_the_daemon_serving_and_a_bad_preempt_is_refused(daemon) -> None:
    """SIGUSR1 (Slurm's --signal warning reaches every step of the job: a daemon inside the
    allocation too) killed the daemon: its default action."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        daemon.proc.send_signal(sig)
    conn = Connection(daemon.endpoint, 5)
    try:
        conn.call("hello", job="warned", pid=os.getpid(), on_busy="wait")
        for bad in (-1, "soon", True, None):
            with pytest.raises(SnapdError, match="deadline_s"):
                conn.call("preempt", deadline_s=bad)
        assert conn.call("preempt", deadline_s=5)["type"] == "noted"
    finally:
        conn.close()
    with snapd.connect("warned", endpoint=daemon.endpoint, spawn=False) as c:
        c.snapshot({"w": np.arange(10.0)}, step=1).wait(30)
    assert daemon.proc.poll() is None
    assert "SIGUSR1: a scheduler's warning" in daemon.log_text()


def test_a_snapshot_granted_a_buffer_before_the_drain_is_persisted_when_it_comes(start) -> None:
    """SIGTERM while a client writes into the host buffer it was granted: its snapshot is on its way,
    and the drain waits for it (the daemon exited, and the snapshot found no one)."""
    import mmap

    d = start()
    conn = Connection(d.endpoint, 5)
    try:
        conn.call("hello", job="granted", pid=os.getpid(), on_busy="wait")
        grant = conn.call("acquire", nbytes=16, emergency=False)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # (the client writes its bytes meanwhile)
        want = np.arange(4, dtype=np.float32) + 0.5
        with open(grant["path"], "r+b") as f, mmap.mmap(f.fileno(), grant["bytes"]) as m:
            m[:16] = want.tobytes()
        tensors = [{"key": "w", "kind": "numpy", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}]
        sent = conn.call("snapshot", lease=grant["lease"], step=1, metrics={}, emergency=False, layout=1,
                         tensors=tensors,
                         tree={"t": "dict", "k": ["w"], "v": [{"t": "tensor", "i": 0}]})
        assert conn.wait(sent["id"], 30)["type"] == "persisted"
    finally:
        conn.close()
    assert d.proc.wait(30) == 0, d.log_text()
    assert snapd.load(d.root, "granted", 1)["w"].tobytes() == want.tobytes()
    assert "waiting for the snapshots of 1 client(s) writing into host buffers" in d.log_text()
