"""``torchrun --nproc-per-node 2 ranks_connect.py ENDPOINT``: each rank connects for its own job (its
rank learned from the process group), then both for one job, as its two ranks. Prints one line per
outcome."""

import sys

import torch.distributed as dist

import snapd.client as snapd
from snapd.errors import SnapdError


def say(text: str) -> None:
    sys.stdout.write(text + "\n")  # (one write: the ranks share the pipe)
    sys.stdout.flush()


dist.init_process_group("gloo")
with snapd.connect(f"own-{dist.get_rank()}", endpoint=sys.argv[1], spawn=False) as c:
    say(f"OWN {c.rank} {c.world_size} {c.local_rank}")
    dist.barrier()
    try:
        shared = snapd.connect("shared", endpoint=sys.argv[1], spawn=False)
    except SnapdError as e:
        say(f"SHARED-REFUSED {e.code} {e}")
        shared = None
    dist.barrier()  # (both tried while both are connected)
    if shared is not None:
        say("SHARED-OK")
        shared.close()
    dist.barrier()
dist.destroy_process_group()
