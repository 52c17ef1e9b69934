"""A writer killed with SIGKILL at any moment leaves only complete snapshots."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

import snapd.client as snapd
from snapd.cli import main as cli

WRITER = """
import sys, numpy as np, snapd.client as c
root = sys.argv[1]
rng = np.random.default_rng(0)
state = {f"w{i}": rng.standard_normal(1_000_000).astype(np.float32) for i in range(8)}
for step in range(1, 10_000):
    for v in state.values():
        v += 1
    c.save(root, "j", state, step=step, keep_last=3)
    print(step, flush=True)
"""


def test_sigkill_during_saves_leaves_no_torn_snapshot(root) -> None:
    for delay in (0.35, 0.8, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True,
                                cwd="/")
        proc.stdout.readline()  # at least one snapshot committed
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        infos = snapd.list_snapshots(root, "j")
        assert infos, "committed snapshots must survive"
        assert cli(["verify", str(root / "j")]) == 0
        for info in infos[-2:]:
            out = snapd.load(root, "j", step=info.step)
            w0 = out["w0"] - info.step  # each step added 1 to the same random start
            np.testing.assert_allclose(w0, snapd.load(root, "j", step=infos[0].step)["w0"] - infos[0].step,
                                       atol=1e-3)
    # the next writer clears the dead writers' leftovers
    snapd.save(root, "j", {"w": np.zeros(1)}, step=99_999)
    assert not [p for p in (root / "j").iterdir() if p.name.startswith((".tmp", ".trash"))]


KILLED_TRAINER = """
import os, signal, sys, numpy as np, snapd.client as snapd
rng = np.random.default_rng(0)
state = {"w": rng.standard_normal(16 << 20).astype(np.float32), "step": 0}  # 64 MiB: a while to encode
with snapd.connect("resume", endpoint=sys.argv[1], spawn=False, keep_last=None) as c:
    for step in (1, 2, 3):
        state["w"][:8] = step
        state["step"] = step
        c.snapshot(state, step=step)  # copied into the daemon's buffer, then the trainer goes on
    os.kill(os.getpid(), signal.SIGKILL)  # before any of them is durable
"""


def test_a_trainer_killed_with_snapshots_in_flight_resumes_from_its_last(start, client_proc) -> None:
    """The snapshots a killed trainer handed over are the daemon's to write; its successor's
    restore("latest") waits for them (sync) instead of resuming from an older step, or from none."""
    d = start("--codec", "shuffle-zstd", "--host-buffer-bytes", str(80 << 20))
    out = client_proc(KILLED_TRAINER, d.endpoint)
    assert out.returncode == -signal.SIGKILL, out.stderr
    with snapd.connect("resume", endpoint=d.endpoint, spawn=False) as c:
        back = c.restore("latest")
        assert back["step"] == 3 and back["w"][:8].tolist() == [3.0] * 8
        assert [s.step for s in c.list()] == [1, 2, 3]
