"""Through a real daemon: an emergency snapshot is flushed ahead of the regular snapshots queued
before it, and stays the resume point when they commit after it (the preemption case)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd

TRAINER = r"""
import signal, sys, time, numpy as np, snapd.client as snapd
rng = np.random.default_rng(0)
w = rng.standard_normal(16 << 20).astype(np.float32)  # 64 MiB: each flush takes a while at shuffle-zstd
state = {"w": w, "step": 0}
c = snapd.connect("pre", endpoint=sys.argv[1], spawn=False, keep_last=None)
c.on_preemption(lambda: (state, state["step"]), signals=(signal.SIGUSR1,), deadline_s=60)
for step in (1, 2, 3, 4):
    state["step"] = step
    w[:4] = step
    c.snapshot(state, step=step)
state["step"] = 5  # (snapshots 1-4 are the daemon's: the trainer goes on)
w[:4] = 5
print("QUEUED", flush=True)
time.sleep(60)
"""


def test_emergency_snapshot_jumps_the_queue_and_stays_latest(start) -> None:
    # (incremental off: snapshots 2-4 differ from 1 in one chunk, and would be flushed in a few ms)
    d = start("--codec", "shuffle-zstd", "--encode-threads", "1", "--incremental", "off")
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, d.endpoint], stdout=subprocess.PIPE, text=True,
                            cwd="/")
    try:
        assert proc.stdout.readline().strip() == "QUEUED"
        # preempted at once, with snapshots 2-4 still queued in the daemon (its flush thread writes
        # one in well under 0.1 s: a pause here let it finish them all)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(120)
    finally:
        proc.kill()
    with snapd.connect("pre", endpoint=d.endpoint, spawn=False) as c:
        latest = c.restore("latest")  # waits for everything the trainer handed over
        infos = c.list()
    assert latest["step"] == 5 and latest["w"][0] == 5
    assert sorted(s.step for s in infos) == [1, 2, 3, 4, 5]
    assert [s.step for s in infos if s.latest] == [5] and [s.step for s in infos if s.emergency] == [5]
    committed = {s.step: json.loads((s.path / "manifest.json").read_text())["created_unix_s"] for s in infos}
    assert committed[5] < committed[4], f"the emergency snapshot was not flushed ahead: {committed}"


HELD_UP = r"""
import sys, time, numpy as np, snapd.client as snapd
c = snapd.connect("held", endpoint=sys.argv[1], spawn=False)
state = {"w": np.ones(1 << 20, np.float32), "step": 7}
c.on_preemption(lambda: (state, 7), deadline_s=2)
print("READY", flush=True)
time.sleep(120)
"""


def test_an_emergency_snapshot_with_no_buffer_free_hands_the_signal_on_by_its_deadline(start) -> None:
    """Every host buffer is held (by another client's snapshots: a slow disk) and memory is at its
    cap: the emergency snapshot waits for one. Its handler gives up at its ``deadline_s`` and hands
    SIGTERM on (under Slurm, in time to requeue before the kill), where it waited busy_wait_s
    (120 s) for a buffer before; the daemon goes on serving."""
    from snapd.client.connection import Connection

    d = start("--host-buffers", "2", "--max-host-buffer-bytes", str(32 << 20),
              "--max-host-memory-bytes", str(64 << 20))
    holder = Connection(d.endpoint, 5)
    holder.call("hello", job="slow", pid=os.getpid(), on_busy="wait")
    leases = [holder.call("acquire", nbytes=1 << 20, emergency=False)["lease"] for _ in range(2)]
    proc = subprocess.Popen([sys.executable, "-c", HELD_UP, d.endpoint], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
        err = proc.stderr.read()
        assert "emergency snapshot failed after" in err and "waits for a host buffer" in err, err
    finally:
        proc.kill()
        proc.wait()
    for lease in leases:
        holder.call("release", lease=lease)
    holder.close()
    with snapd.connect("held", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot({"w": np.full(8, 8.0)}, step=8).wait(30)
        assert [s.step for s in c.list()] == [8]


SLOW_DISK = Path(__file__).parent / "slow_disk"  # (its sitecustomize holds the daemon's fsyncs, writes)

TWO_THEN_PREEMPTED = r"""
import sys, time, numpy as np, snapd.client as snapd
c = snapd.connect("slow", endpoint=sys.argv[1], spawn=False, keep_last=None)
w = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB, written as it is encoded
state = {"w": w, "step": 0}
c.on_preemption(lambda: (state, state["step"]), deadline_s=8)
for step in (1, 2):  # each takes one of the two host buffers, held until its fsync
    w[:4], state["step"] = step, step
    c.snapshot(state, step=step)
w[:4], state["step"] = 3, 3
print("READY", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("written", [True, False], ids=["written-before", "written-after"])
def test_an_emergency_snapshot_gets_the_buffer_of_a_snapshot_that_waits_only_for_its_fsync(
        start, tmp_path, written) -> None:
    """A slow disk: both host buffers are held by snapshots whose fsync has not ended, and memory is
    at its cap. The preempted trainer's emergency snapshot is lent the buffer of one already written
    (its bytes are in the page cache), at once or as soon as one is written, where it waited for an
    fsync past its handler's deadline before and the trainer's last state was lost. The handler
    hands the signal on at its deadline, the state the daemon's; once the disk catches up, every
    snapshot is on it, the emergency one latest."""
    fsync_gate, write_gate = tmp_path / "fsync-gate", tmp_path / "write-gate"
    path = os.pathsep.join(filter(None, [str(SLOW_DISK), os.environ.get("PYTHONPATH")]))
    d = start("--host-buffers", "2", "--max-host-buffer-bytes", str(32 << 20),
              "--max-host-memory-bytes", str(64 << 20), "--codec", "lz4", "--incremental", "off",
              env={"PYTHONPATH": path, "SNAPD_TEST_SLOW_FSYNC": str(fsync_gate),
                   "SNAPD_TEST_SLOW_WRITE": str(write_gate)})
    fsync_gate.touch()
    if not written:
        write_gate.touch()
    proc = subprocess.Popen([sys.executable, "-c", TWO_THEN_PREEMPTED, d.endpoint], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        with snapd.connect("watch", endpoint=d.endpoint, spawn=False) as watch:
            def status() -> tuple[dict, int]:
                s = watch.status()
                return s["in_flight"], s["waiting_for_buffer"]
            # (snapshots 1 and 2 written, or copied and held before their writes)
            d.wait_for(lambda: status() == ({"ENCODED" if written else "COPIED": 2}, 0), timeout=30)
            proc.send_signal(signal.SIGTERM)
            if not written:  # the emergency request waits for a buffer; then the first write ends
                d.wait_for(lambda: status()[1] == 1, timeout=30)
                write_gate.unlink()
            d.wait_for(lambda: sum(status()[0].values()) == 3, timeout=30)  # (the emergency one handed over)
        assert proc.wait(30) == -signal.SIGTERM  # (at its deadline: the disk is still held)
        err = proc.stderr.read()
        assert "emergency snapshot of step 3 handed to the daemon, not yet persisted" in err, err
    finally:
        proc.kill()
        proc.wait()
        fsync_gate.unlink(missing_ok=True)
        write_gate.unlink(missing_ok=True)
    with snapd.connect("slow", endpoint=d.endpoint, spawn=False) as c:
        latest = c.restore("latest")  # (waits for what the trainer handed over)
        infos = c.list()
    w = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)
    w[:4] = 3
    assert latest["step"] == 3 and np.array_equal(latest["w"], w)
    assert [s.step for s in infos] == [1, 2, 3] and [s.step for s in infos if s.latest] == [3]
    assert "lent the host buffer of slow step 1" in d.log_text()

