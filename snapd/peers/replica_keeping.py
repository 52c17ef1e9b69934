"""Which of the parts a daemon holds for its peers it keeps (snapd.peers.replicas), and what each
holds. Per job: the newest step (taken last, as the index orders latest, not the highest) that is
committed (every rank's part durable on some node, as the part book knows) and whose replicas are
all complete, with anything newer; of a single process's job, the snapshot taken last. Older ones
are superseded: they go when room is needed, and when a newer step is committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Key = tuple[str, int, int]  # (job, step, rank)


@dataclass
class Replica:
    job: str
    step: int
    rank: int
    world_size: int
    run: str
    node: str  # the daemon that sent it
    manifest: bytes
    checksum: str
    sizes: dict[str, int]  # data file -> its bytes (from the manifest)
    files: dict[str, bytearray] = field(default_factory=dict)  # (in memory; each made at its first piece)
    linked: set[str] = field(default_factory=set)  # files taken from an older step's replica
    written: set[str] = field(default_factory=set)  # files that got pieces
    directory: Path | None = None  # (on disk instead)
    received: int = 0
    complete: bool = False
    touched: float = field(default_factory=time.monotonic)  # the last piece written
    whole: bool = False  # a single process's snapshot (rank 0 of 1; its manifest names no part)
    taken: float = 0.0  # when its state was handed over (its commit, where not recorded)

    @property
    def order(self) -> tuple[float, int]:
        """What orders a single process's snapshots, as its index orders ``latest``."""
        return self.taken, self.step

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values()) + len(self.manifest)

    @property
    def where(self) -> str:
        return "disk" if self.directory is not None else "memory"


def superseded(parts: dict[Key, Replica], r: Replica, committed: Callable[[str, int], bool]) -> bool:
    """Whether a newer step of ``r``'s job is committed and held complete here."""
    if r.whole:
        newest = newest_whole(parts, r.job)
        return newest is not None and newest.order > r.order
    mine = step_order(parts, r.job, r.step)
    return any(step_order(parts, r.job, s) > mine for s in complete_steps(parts, r.job, committed))


def step_order(parts: dict[Key, Replica], job: str, step: int) -> tuple[float, int]:
    """When a step of a job on several ranks was taken, by the parts of it held here (the global
    snapshot's time is its parts' latest), then its step."""
    return max((o.taken for o in parts.values() if o.job == job and o.step == step and not o.whole),
               default=0.0), step


def newest_whole(parts: dict[Key, Replica], job: str) -> Replica | None:
    """The single process's snapshot of ``job`` taken last that is held complete here (a run resumed
    from an earlier step takes lower steps later: those are its newest)."""
    return max((o for o in parts.values() if o.job == job and o.whole and o.complete),
               key=lambda o: o.order, default=None)


def complete_steps(parts: dict[Key, Replica], job: str, committed: Callable[[str, int], bool]) -> set[int]:
    """The steps of ``job`` committed (every rank's part durable somewhere) whose replicas here are
    all complete: a step some rank never finished is never one (its older step stays). A single
    process's snapshot is sent once committed on its node."""
    by_step: dict[int, list[Replica]] = {}
    for o in parts.values():
        if o.job == job and not o.whole:
            by_step.setdefault(o.step, []).append(o)
    return {s for s, rs in by_step.items() if all(o.complete for o in rs) and committed(job, s)}


def superseded_keys(parts: dict[Key, Replica], job: str, committed: Callable[[str, int], bool]) -> list[Key]:
    """The parts of ``job`` to drop: every single process's snapshot older than its newest, and every
    step older than the newest complete one."""
    out: list[Key] = []
    whole = newest_whole(parts, job)
    if whole is not None:
        out += [k for k, o in parts.items() if o.job == job and o.whole and o.order < whole.order]
    complete = complete_steps(parts, job, committed)
    if complete:
        newest = max(step_order(parts, job, s) for s in complete)  # (taken last: not the highest step)
        out += [k for k, o in parts.items()
                if o.job == job and not o.whole and step_order(parts, job, o.step) < newest]
    return out
