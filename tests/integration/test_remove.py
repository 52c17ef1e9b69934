"""A user removes one of their snapshots through the daemon (``Client.remove``, ``snapd rm``): it is
gone from the disk, the index and ``latest``; a step being written, a running job's steps from
outside it, and a step that is not there are each answered clearly; the steps left restore bit for
bit. (The multi-user case, where only the daemon may delete: test_access.py; the remote tier:
test_remote.py; copies on peers: test_peer_single.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd
from snapd.errors import Busy

SLOW_DISK = Path(__file__).parent / "slow_disk"


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(50_000).astype(np.float32), "step": step}


def rm(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapd", "rm", *args, "--endpoint", d.endpoint],
                          capture_output=True, text=True, timeout=60, cwd="/")


def test_a_removed_snapshot_is_gone_and_latest_and_best_move_back(start) -> None:
    d = start()
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=None, best=("loss", "min")) as c:
        for step, loss in ((1, 0.5), (2, 0.1), (3, 0.3)):
            c.snapshot(state(step), step=step, metrics={"loss": loss}).wait(30)
        assert c.remove(3) is True and c.remove(2) is True  # the latest, then the best
        assert [s.step for s in c.list()] == [1]
        assert not (d.root / "job" / "step-000000000003").exists()
        back = c.restore()
        assert back["step"] == 1 and back["w"].tobytes() == state(1)["w"].tobytes()
        assert c.restore("best")["step"] == 1
        assert c.remove(3) is False  # (gone already: nothing to remove, no error)
        c.snapshot(state(3), step=3).wait(30)  # the step made again is the job's latest
        assert [s.step for s in c.list()] == [1, 3] and c.restore()["step"] == 3


def test_a_step_being_written_is_refused_and_removed_once_persisted(start, tmp_path) -> None:
    # (the daemon's fsyncs wait on a file, tests/integration/slow_disk: the step stays in flight until
    # the test lets it go, however fast the machine)
    gate = tmp_path / "fsync-gate"
    gate.touch()
    path = os.pathsep.join(filter(None, [str(SLOW_DISK), os.environ.get("PYTHONPATH")]))
    d = start("--codec", "raw", env={"PYTHONPATH": path, "SNAPD_TEST_SLOW_FSYNC": str(gate)})
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        pending = c.snapshot(state(5), step=5)
        with pytest.raises(Busy, match="step 5 of job job is being written: remove it once it is persisted"):
            c.remove(5)
        gate.unlink()
        pending.wait(60)
        assert c.remove(5) is True and c.list() == []


def test_snapd_rm_removes_steps_of_a_job_that_is_not_running_and_refuses_a_running_one(start) -> None:
    d = start()
    with snapd.connect("run", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        for step in (1, 2, 3):
            c.snapshot(state(step), step=step).wait(30)
        refused = rm(d, "run", "1")  # the job's own process holds it: it removes steps itself
        assert refused.returncode == 2 and f"pid {os.getpid()}" in refused.stderr \
            and "a running job removes its own steps: Client.remove(step)" in refused.stderr, refused.stderr
        assert [s.step for s in c.list()] == [1, 2, 3]
    out = rm(d, "run", "1", "3", "9")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["removed run step 1", "removed run step 3",
                                       "run step 9: not on this node"]
    with snapd.connect("run", endpoint=d.endpoint, spawn=False) as c:
        assert [s.step for s in c.list()] == [2] and c.restore()["w"].tobytes() == state(2)["w"].tobytes()
    assert rm(d, "never-ran", "1").stdout == "never-ran step 1: not on this node\n"
    bad = rm(d, "run", "-4")
    assert bad.returncode == 2 and bad.stderr.startswith("snapd: error:") and "Traceback" not in bad.stderr
