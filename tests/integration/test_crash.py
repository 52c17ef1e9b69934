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
