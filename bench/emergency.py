"""Emergency dump: SIGTERM to a trainer -> its state durable on disk.

A child process holds the state and installs each method's handler: snapd's
``on_preemption`` (an emergency snapshot, waited until persisted), and for
the peers a SIGTERM handler that saves, fsyncs and renames into place. The
time is from the parent's SIGTERM to the child's exit, which each handler
allows only once the state is durable; the artifact is then checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import Recorder

METHODS = ("snapd", "torch.save + fsync", "DCP save")


def run(nbytes: int, work: Path, endpoint: str, root: Path, rec: Recorder, repeats: int) -> None:
    from snapd.client.local import list_snapshots

    for method in METHODS:
        times = []
        for i in range(repeats):
            out = work / f"emergency-{method.split()[0].replace('.', '-')}-{i}"
            child = subprocess.Popen([sys.executable, "-m", "bench.emergency", "child", method, str(nbytes),
                                      str(out), endpoint], stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
            assert child.stdout is not None
            if child.stdout.readline().strip() != "READY":
                raise RuntimeError(f"{method}: the trainer did not start")
            t = time.perf_counter()
            child.send_signal(signal.SIGTERM)
            child.wait(600)
            times.append(time.perf_counter() - t)
            done = len(list_snapshots(root, out.name)) == 2 if method == "snapd" else out.exists()
            if not done:
                raise RuntimeError(f"{method}: nothing durable after SIGTERM (trainer exit "
                                   f"{child.returncode})")
        rec.add("emergency", method, "sigterm_to_durable", times, state_bytes=nbytes)


def child(method: str, nbytes: int, out: Path, endpoint: str) -> None:
    import torch

    from bench.durable import synthetic
    from bench.peers import fsync_tree

    state = synthetic(nbytes, seed=7)
    if method == "snapd":
        import snapd.client as snapd

        c = snapd.connect(out.name, endpoint=endpoint, spawn=False, keep_last=2)
        c.snapshot(state, step=1).wait()  # a trainer has snapshotted before it is preempted
        c.on_preemption(lambda: (state, 2))
    else:
        def handler(signum: int, frame: object) -> None:
            tmp = out.with_name(out.name + ".tmp")
            if method == "DCP save":
                import torch.distributed.checkpoint as dcp

                dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
            else:
                with open(tmp, "wb") as f:
                    torch.save(state, f)
            fsync_tree(tmp)
            os.rename(tmp, out)
            fd = os.open(out.parent, os.O_RDONLY)
            os.fsync(fd)
            os._exit(0)
        signal.signal(signal.SIGTERM, handler)
        if method == "DCP save":
            # noqa: F401  (imported before the signal, as a trainer would)
            import torch.distributed.checkpoint
    print("READY", flush=True)
    while True:
        time.sleep(0.05)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
