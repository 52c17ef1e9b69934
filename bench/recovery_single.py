"""A single process's job on a lost node, in bench/recovery.py's run (``python -m bench --only
recovery``): the same cluster of three daemons, a job on one process on node 0 whose snapshots are
copied whole to node 1 (the ring's next; issue 26). Its ``--mib`` MiB state (raw) is restored, each
timing from ``connect()`` after ``os.sync()`` and ``SETTLE_S``:

1. from node 0's own disk, warm, and again with the step's pages dropped (a node rebooted);
2. on a replacement node 0 (its daemon killed, its disk removed, a daemon started on an empty root,
   without the remote tier): ``restore()`` finds the copy on node 1 and brings it whole, checked and
   committed; then again with the trainer waiting until the snapshot is here (its hello starts
   bringing it: snapd.daemon.prefetch) before it calls ``restore()``, the two parts timed apart.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

import numpy as np

from bench.recovery import REPO, Cluster, _restore, _settled, _state

SOLO, HOME = "solo", 0  # node 0's job: its copies go to node 1
LOCAL, COLD = "local disk", "local disk, cold"
PEERS = "peer's copy (replacement node)"
PREFETCH = "peer's copy: connect() to the snapshot here (prefetch)"
AFTER = "peer's copy: restore() once it is here"
ROWS = (LOCAL, COLD, PEERS, PREFETCH, AFTER)


def _snapshot(cluster: Cluster, step: int) -> None:
    code = ("import sys, snapd.client as s; from bench.recovery import _state\n"
            "ep, step, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
            "with s.connect('solo', endpoint=ep, spawn=False, keep_last=2) as c:\n"
            "    c.snapshot(_state(mib, 9), step=step).wait(600)\n")
    assert subprocess.run([sys.executable, "-c", code, cluster.endpoints[HOME], str(step), str(cluster.mib)],
                          cwd=REPO, timeout=900).returncode == 0


def run(cluster: Cluster, reps: int) -> dict[str, list[float]]:
    from bench.restore import drop_cache

    times: dict[str, list[float]] = {}
    want = _state(cluster.mib, 9)["own"]
    for rep in range(reps):
        step = rep + 1
        for i in range(len(cluster.procs)):  # (every node uploads again: _settled waits for the bucket too)
            if cluster.url is not None and not cluster.remote[i]:
                cluster.procs[i].terminate()
                cluster.procs[i].wait(120)
                cluster.start(i)
        _snapshot(cluster, step)
        _settled(cluster, step)
        snap = cluster.work / f"node{HOME}" / SOLO / f"step-{step:012d}"
        for method in (LOCAL, COLD):
            if method == COLD:
                drop_cache(snap)
            took, back, _ = _restore(cluster.endpoints[HOME], job=SOLO, who={})
            times.setdefault(method, []).append(took)
            assert all(np.array_equal(back["own"][k], v) for k, v in want.items())
            del back
        for wait in (False, True):
            cluster.lose(HOME)
            cluster.start(HOME, remote=False)
            took, back, here = _restore(cluster.endpoints[HOME], snap / "manifest.json" if wait else None,
                                        job=SOLO, who={})
            times.setdefault(AFTER if wait else PEERS, []).append(took)
            if wait:
                times.setdefault(PREFETCH, []).append(here)
            assert all(np.array_equal(back["own"][k], v) for k, v in want.items())
            del back
    return times


def markdown(times: dict[str, list[float]], mib: int) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}

    def row(name: str) -> str:
        return f"| {name} | {med[name]:.3f} | {mib / med[name]:.0f} | {med[name] / med[LOCAL]:.2f}x |"

    return "\n".join([
        "## A single process's job", "",
        f"The same cluster: a job on one process on node 0, {mib} MiB (raw), its snapshots copied whole to "
        "node 1; restored on node 0, then on a replacement node 0 with an empty disk.", "",
        "| restore of the single process's job | seconds | MiB/s | ÷ local disk |", "|---|---|---|---|",
        *[row(r) for r in ROWS], "",
        f"From the peer's copy against local disk with its pages dropped: {med[PEERS] / med[COLD]:.2f}x; "
        f"a trainer whose startup outlasts the transfer ({med[PREFETCH]:.3f} s) waits {med[AFTER]:.3f} s "
        "in `restore()`.", ""])
