"""Which rank of which job this process is: ``connect()`` learns it, as DCP and Lightning do.

From ``torch.distributed`` when a process group is initialized (only if torch is already imported:
a process that never imported it has no group), else from the launcher's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, as torchrun sets them), else from ``connect(rank=, world_size=)``;
a single process is rank 0 of 1. Explicit arguments that contradict the group or the launcher are
refused (a rank that believes it is another would write another rank's part), except rank=0,
world_size=1: one rank of a job that writes it alone (a full state gathered on that rank).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from snapd.errors import InvalidArgument


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "a single process"  # where they came from (said in errors and logs)


def _from_group() -> Ranks | None:
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    local = _env_int("LOCAL_RANK")
    return Ranks(dist.get_rank(), dist.get_world_size(), local if local is not None else 0,
                 "the torch.distributed process group")


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"${name} must be an integer, got {text!r}") from None


def _from_environment() -> Ranks | None:
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or world is None:
        return None
    local = _env_int("LOCAL_RANK")
    return Ranks(rank, world, local if local is not None else 0, "$RANK and $WORLD_SIZE")


def detect(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """This process's rank, world size and local rank (see the module's docstring for the order)."""
    for name, v in (("rank", rank), ("world_size", world_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise InvalidArgument(f"{name} must be an int, got {v!r}")
    if (rank is None) != (world_size is None):
        raise InvalidArgument("pass rank= and world_size= together (or neither: they are then learned from "
                              "torch.distributed or $RANK and $WORLD_SIZE)")
    found = _from_group() or _from_environment()
    if rank == 0 and world_size == 1 and found is not None:  # one rank writes the job alone (a full state)
        return Ranks(0, 1, found.local_rank, "connect(rank=0, world_size=1): this rank writes alone")
    if found is not None and rank is not None and (rank, world_size) != (found.rank, found.world_size):
        raise InvalidArgument(f"rank={rank}, world_size={world_size} contradict {found.source}: rank "
                              f"{found.rank} of {found.world_size}")
    if found is None:
        found = Ranks(rank, world_size, 0, "connect(rank=, world_size=)") if rank is not None else Ranks()
    if found.world_size < 1 or not 0 <= found.rank < found.world_size or found.local_rank < 0:
        raise InvalidArgument(f"rank {found.rank} of world size {found.world_size} (local rank "
                              f"{found.local_rank}) from {found.source} is not a rank of that world")
    return found


def run_id(explicit: str | None, ranks: Ranks) -> str:
    """Which run of the job this process belongs to, the same on all its ranks: the parts of one
    step commit together only within one run, so a job restarted (after a crash, on another world
    size) never completes a step with a part its previous run left. ``connect(run_id=)``, else
    ``$SNAPD_RUN_ID``, else the launcher's (torchrun's run id and restart count; Slurm's job, step
    and restart count), else '' (one run: launchers without such ids should set one). No
    collective is made for it: a rank that connects alone must not wait for the others."""
    if explicit is None:
        explicit = os.environ.get("SNAPD_RUN_ID") or None
    if explicit is not None:
        if not isinstance(explicit, str) or not 0 < len(explicit) <= 128:
            raise InvalidArgument(f"run_id must be a str of 1-128 characters, got {explicit!r}")
        return explicit
    if ranks.world_size == 1:
        return ""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if env.get("SLURM_JOB_ID"):
        return (f"slurm:{env['SLURM_JOB_ID']}:{env.get('SLURM_STEP_ID', '')}:"
                f"{env.get('SLURM_RESTART_COUNT', '0')}")
    return ""
