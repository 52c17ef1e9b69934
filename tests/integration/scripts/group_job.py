"""``torchrun --nproc-per-node N group_job.py ENDPOINT,... JOB STEP[,STEP...] [restore] [late]``: a job of N
ranks in a real process group (gloo), rank r snapshotting through ``ENDPOINT[r]`` (each daemon a
node) with its rank and world size learned from the group, and nothing else telling the daemons of
each other: they learn the job's other daemons from its ranks (client/group_peers.py). ``own`` is
each rank's (``per_rank``: 100 x step + rank), ``w`` the same on all. ``restore``: the latest first;
``late``: ``connect()`` before ``init_process_group`` (its rank from torchrun's environment).
Prints ``RESTORED rank step own w`` and ``COMMITTED rank step``, each line in one write (the ranks
share the pipe)."""

import os
import sys

import numpy as np
import torch.distributed as dist

import snapd.client as snapd


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


endpoints, job, steps = sys.argv[1].split(","), sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
late = "late" in sys.argv[4:]
if not late:
    dist.init_process_group("gloo")
rank = int(os.environ["RANK"])
client = snapd.connect(job, endpoint=endpoints[rank], spawn=False, per_rank=["own"])
if late:
    dist.init_process_group("gloo")
if "restore" in sys.argv[4:]:
    assert client.list(), "nothing to resume from"  # (the README's loop: list, then restore)
    back = client.restore()
    say(f"RESTORED {rank} {back['step']} {int(back['own'][0])} {float(back['w'][0])}")
for step in steps:
    state = {"w": np.full(4096, step, np.float32), "own": np.full(8, 100 * step + rank, np.int64),
             "step": step}
    client.snapshot(state, step=step).wait(120)
    say(f"COMMITTED {rank} {step}")
dist.barrier()
client.close()
dist.destroy_process_group()
