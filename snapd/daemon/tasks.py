"""Snapshots in flight: each one's ``Task``, its states, and the server thread's table of them.

A task's state moves only through ``snapd.daemon.pipeline.Pipeline`` (it owns every transition
and every "done" event); the thread that holds the task at a stage is the only one to touch it.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapd.errors import SnapdError
from snapd.format.leaves import TensorLeaf
from snapd.format.writer import Retention

RECEIVED, COPIED, ENCODED, PERSISTED, FAILED = "RECEIVED", "COPIED", "ENCODED", "PERSISTED", "FAILED"
PART_DURABLE = "PART_DURABLE"  # a rank's part is durable; the other ranks' parts are not all in yet
TRANSITIONS = {RECEIVED: {COPIED, FAILED}, COPIED: {ENCODED, FAILED},
               ENCODED: {PERSISTED, PART_DURABLE, FAILED}, PART_DURABLE: {PERSISTED, FAILED},
               PERSISTED: set(), FAILED: set()}
_seq = itertools.count()


def next_seq() -> int:
    return next(_seq)


@dataclass(frozen=True)
class HostSpan:
    """The host buffer a snapshot lies in: its file, the bytes the snapshot spans, its address
    here, and whether it serves a uid other than the daemon's (snapd.daemon.buffer_reads)."""

    path: Path
    end: int
    address: int
    foreign: bool


@dataclass
class Task:
    peer: bytes
    req_id: int
    job: str
    step: int
    metrics: dict[str, Any]
    emergency: bool
    tree: dict
    leaves: list[TensorLeaf]
    lease: int
    retention: Retention
    raw_bytes: int
    root: Path  # where this client's jobs live (the root, or the root's per-user directory)
    codec: str | None = None  # fixed before the copy when the GPU shuffled the chunks for it
    buffer: HostSpan | None = None
    state: str = RECEIVED
    seq: int = field(default_factory=next_seq)
    times: dict[str, float] = field(default_factory=lambda: {RECEIVED: time.monotonic()})
    taken_unix_s: float = field(default_factory=time.time)  # orders ``latest`` (snapd.format.index)
    rank: int = 0  # a rank's part of a global snapshot when world_size > 1 (snapd.format.global_commit)
    world_size: int = 1
    per_rank: tuple[str, ...] = ()
    run: str = ""
    replicas: int | None = None  # the job's replication factor, if it set one (snapd.daemon.peers)
    grace_s: float | None = None  # an emergency snapshot's time before the scheduler's kill, if known

    @property
    def key(self) -> str:
        """The job's directory: two users' jobs of one name are two jobs (codec choice, status)."""
        return str(self.root / self.job)

    def advance(self, state: str) -> None:
        """(Called by the pipeline only.)"""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"snapshot {self.job}@{self.step}: {self.state} -> {state} is not allowed")
        self.state = state
        self.times[state] = time.monotonic()


def failure_fields(error: Exception, stage: str) -> tuple[str, str]:
    """The wire error code and message of a failure in ``stage`` (a bug of ours is named as one)."""
    if isinstance(error, SnapdError):
        return error.code, str(error)
    if isinstance(error, OSError):
        return ("copy" if stage == "copy" else "flush"), str(error)
    return "internal", f"internal error: {type(error).__name__}: {error}"


class TaskTable:
    """The snapshots accepted and not yet ended, by sequence number (the server thread's only)."""

    def __init__(self) -> None:
        self._tasks: dict[int, Task] = {}

    def add(self, task: Task) -> None:
        self._tasks[task.seq] = task

    def get(self, seq: int) -> Task | None:
        return self._tasks.get(seq)

    def pop(self, seq: int) -> Task | None:
        return self._tasks.pop(seq, None)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def of(self, peer: bytes) -> list[Task]:
        """The snapshots of one connection still in flight (they hold its buffers)."""
        return [t for t in self._tasks.values() if t.peer == peer]

    def of_job(self, job: str, root: Path, writing: bool = False) -> set[int]:
        """The job's snapshots in flight; ``writing``: not those whose part is durable already."""
        return {t.seq for t in self._tasks.values() if t.job == job and t.root == root
                and not (writing and t.state == PART_DURABLE)}

    def pending_bytes(self, root: Path) -> int:
        """The bytes being written under one user's directory (the disk quota counts them)."""
        return sum(t.raw_bytes for t in self._tasks.values() if t.root == root)

    def by_state(self) -> dict[str, int]:
        return dict(collections.Counter(t.state for t in self._tasks.values()))
