"""What the server knows of each client: its session, and which clients are gone."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from snapd.daemon.layouts import Layout
from snapd.daemon.regions import Region
from snapd.errors import ProtocolError
from snapd.format.jobdir import check_job_name, pid_alive
from snapd.format.writer import Retention

log = logging.getLogger(__name__)


@dataclass
class Session:
    peer: bytes
    job: str
    pid: int  # from SO_PEERCRED, like uid: the kernel's word, not the client's
    uid: int
    jobs_root: Path  # where this client's jobs live: the root, or the root's per-user directory
    retention: Retention
    on_busy: str
    notices: bool = False  # it asked to be told when a request waits (``waiting``)
    leases: set[int] = field(default_factory=set)  # buffers granted, snapshot not yet sent
    regions: dict[int, Region] = field(default_factory=dict)
    layout: Layout | None = None  # the last layout accepted on this connection
    last_snapshot: dict | None = None  # its step, tensor count and bytes by path (``snapd status``)
    expects: int | None = None  # the buffer its job's last snapshot needs, when it resumed (Leases.expect)
    rank: int = 0  # which rank of how many (client/ranks.py)
    world_size: int = 1
    per_rank: tuple[str, ...] = ()  # key paths whose values are each rank's own (snapd.format.rank_parts)
    run: str = ""  # which run of the job (client/ranks.py): parts commit together only within one
    replicas: int | None = None  # copies of each part on other nodes (None: the daemon's; docs/peers.md)
    own_pid: int | None = None  # the pid it knows itself by, when the kernel says another (a container)
    # its preemption handler's deadline (``preempt``): a drain waits that long for its emergency snapshot
    preempt_s: float | None = None
    heard_in_drain: bool = False  # it asked for a buffer or sent a snapshot since the drain began


def job_in_use(sessions: dict[bytes, Session], s: Session) -> str:
    """Why ``s`` may not write its job ('' if it may): another live process writes it as the same
    rank (two single processes, or two claiming one rank), or the job's ranks on this node disagree
    on the world size. Snapshots of one job from two processes of one rank would interleave."""
    for other in sessions.values():
        same_job = other.job == s.job and other.jobs_root == s.jobs_root
        if not same_job or (other.pid == s.pid and s.pid > 0) or not pid_alive(other.pid):
            continue
        if s.world_size == 1 and other.world_size == 1:
            return (f"job {s.job} is being written by another process, pid {other.pid}: two processes "
                    "writing one job would interleave their snapshots; use another job name, or end that one")
        if other.world_size != s.world_size:
            return (f"job {s.job} runs with world size {other.world_size} here (rank {other.rank}, pid "
                    f"{other.pid}); this process says {s.world_size}: the world size changes only across a "
                    "restart of every rank")
        if other.rank == s.rank:
            return f"rank {s.rank} of job {s.job} is already connected from pid {other.pid}: two processes " \
                   "claim the same rank"
    return ""


def new_session(sessions: dict[bytes, Session], peer: bytes, hello: dict, pid: int, uid: int,
                jobs_root: Path) -> Session:
    """The session a ``hello`` opens (``pid`` and ``uid``: the kernel's word), or the refusal."""
    rank, world_size = hello.get("rank") or 0, hello.get("world_size") or 1
    if rank >= world_size:
        raise ProtocolError(f"rank {rank} is not a rank of world size {world_size}", "bad_field")
    retention = Retention(keep_last=hello.get("keep_last"), keep_every_steps=hello.get("keep_every_steps"),
                          best=tuple(hello["best"]) if hello.get("best") else None)
    s = Session(peer, check_job_name(hello["job"]), pid, uid, jobs_root, retention, hello["on_busy"],
                notices=bool(hello.get("notices")), rank=rank, world_size=world_size,
                per_rank=tuple(hello.get("per_rank") or ()), run=hello.get("run") or "",
                replicas=hello.get("replicas"), own_pid=hello["pid"] if hello["pid"] != pid else None)
    taken = job_in_use(sessions, s)
    if taken:
        raise ProtocolError(taken, "job_in_use")
    log.info("client pid %d uid %d connected for job %s (rank %d of %d)", pid, uid, s.job, rank, world_size)
    return s


def gone(sessions: dict[bytes, Session]) -> list[Session]:
    """The sessions whose client process is gone; their regions' files are unlinked (copies in
    flight keep their descriptors)."""
    out = []
    for s in sessions.values():
        if s.pid <= 0 or pid_alive(s.pid):  # (0: a pid namespace the daemon cannot see; it says bye)
            continue
        log.info("client pid %d (job %s) is gone; releasing its buffers", s.pid, s.job)
        out.append(s)
        for region in s.regions.values():
            try:
                os.unlink(region.path)
            except OSError:
                pass
    return out
