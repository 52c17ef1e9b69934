"""``python rank_job.py ENDPOINT JOB RANK WORLD RUN STEP[,STEP...] [stall-at STEP] [restore]
[replicas=N] [frozen] [restore=STEP] [gen=N]``: one rank of a job with no process group (its rank
given, as a launcher without torch would), snapshotting a state whose ``w`` is the same on every
rank and whose ``own`` is this rank's (``per_rank``: 100 x step + rank, plus 10000 x ``gen``, which
tells runs apart), and waiting for each global snapshot (``restore``: first restores the latest;
``restore=STEP``: that step; ``replicas=N``: the job's peer replication factor; ``frozen``: the
state also holds this rank's 8 MiB ``base`` that never changes, as a frozen model's, and a restore
says ``BASE ok``).
Prints ``COMMITTED step`` or ``FAILED step code: message`` per step, and ``STALLING step`` before
stalling for good at that step (a test then kills it there)."""

import sys
import threading

import numpy as np

import snapd.client as snapd
from snapd.errors import SnapdError


def state(step: int, rank: int) -> dict:
    out = {"w": np.full(4096, step, np.float32), "own": np.full(8, 100 * step + rank + 10000 * gen, np.int64),
           "step": step}
    if frozen:
        out["base"] = base(rank)
    return out


def base(rank: int) -> np.ndarray:
    return np.random.default_rng(1000 + rank).standard_normal(2 << 20, dtype=np.float32)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


endpoint, job, rank, world, run, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5], [int(s) for s in sys.argv[6].split(",")]
stall = int(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[7] == "stall-at" else None
replicas = next((int(a.split("=")[1]) for a in sys.argv[7:] if a.startswith("replicas=")), None)
frozen = "frozen" in sys.argv[7:]
gen = next((int(a.split("=")[1]) for a in sys.argv[7:] if a.startswith("gen=")), 0)
at = next((int(a.split("=")[1]) for a in sys.argv[7:] if a.startswith("restore=")), None)
client = snapd.connect(job, endpoint=endpoint, spawn=False, rank=rank, world_size=world, run_id=run,
                       per_rank=["own", "base"] if frozen else ["own"], replicas=replicas)
if "restore" in sys.argv[7:] or at is not None:
    back = client.restore("latest" if at is None else at)
    say(f"RESTORED {back['step']} {int(back['own'][0])} {float(back['w'][0])}")
    if frozen:
        say(f"BASE {'ok' if np.array_equal(back['base'], base(rank)) else 'differs'}")
for step in steps:
    if step == stall:
        say(f"STALLING {step}")
        threading.Event().wait()
    try:
        client.snapshot(state(step, rank), step=step).wait(120)
        say(f"COMMITTED {step}")
    except SnapdError as e:
        say(f"FAILED {step} {e.code}: {e}")
client.close()
