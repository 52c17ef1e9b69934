"""The part book: which rank parts other nodes' daemons hold, and the global commit it makes
possible on nodes that share no filesystem (snapd.format.spread_commit).

Every daemon announces each rank part it makes to every peer (its manifest, a few KiB to MiB;
snapd.daemon.replication). A part of this node that waits for its step (snapd.daemon.rank_commits)
is committed here once the parts in this node's pending directory and the parts announced cover
every rank of the step, run and world size. An announcement is only remembered: it never creates
anything under the root, and the ``KEEP_STEPS`` steps of a job heard of last are kept (not the
highest: a run that went back to an earlier step announces lower ones).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from snapd.daemon.rank_commits import Waiting
from snapd.daemon.tasks import Task
from snapd.errors import FormatError, InvalidArgument
from snapd.format.global_manifest import PART_DIR_RE
from snapd.format.manifest import Manifest, parse, taken_of
from snapd.format.retention import Retention
from snapd.format.spread_commit import commit_known

log = logging.getLogger(__name__)

KEEP_STEPS = 8
KEEP_ALL = 4096  # step entries of all jobs together (a peer announcing endless jobs cannot fill memory)

Key = tuple[str, int, int, str]  # job path, step, world size, run


class PartBook:
    def __init__(self, root: Path, retention: Callable[[Task], Retention]) -> None:
        self.root, self._retention = root, retention
        self.on_committed: Callable[[str], None] = lambda job: None  # (the replica store's prune)
        self._parts: dict[Key, dict[int, tuple[Manifest, str]]] = {}
        self._lock = threading.Lock()

    def job_path(self, job_dir: Path) -> str:
        return os.path.relpath(job_dir, self.root)

    def announce(self, job: str, step: int, world_size: int, run: str, rank: int, node: str,
                 raw: bytes) -> None:
        """Remember rank ``rank``'s part of a step, as ``node`` announced it (any thread)."""
        try:
            m = parse(raw, f"{node}'s announcement of {job} step {step} rank {rank}")
        except FormatError as e:
            raise InvalidArgument(str(e)) from None
        if m.part is None or m.step != step or m.part.get("rank") != rank or rank >= world_size or \
                m.part.get("world_size") != world_size or m.part.get("run") != run:
            raise InvalidArgument(f"{job} step {step} rank {rank}: the manifest announced is of another part")
        with self._lock:
            self._record((job, step, world_size, run), rank, m, node)
            complete = len(self._parts.get((job, step, world_size, run), {})) == world_size
        if complete:
            self.on_committed(job)

    def _record(self, key: Key, rank: int, m: Manifest, node: str, mine: bool = False) -> None:
        """(Under the lock.) The step's entry moves to the end: the book keeps the steps heard of
        last, not the highest (a run resumed from an earlier step announces lower steps)."""
        parts = self._parts.pop(key, {})
        old = parts.get(rank)
        if mine and old is not None and old[0].checksum != m.checksum:
            # this node made the step again (the run went back to an earlier step): the other
            # ranks' parts of its first making must not commit with this one; those taken nearer
            # to the new part than to the old one are already of the new making, and stay
            before, now = taken_of(old[0]), taken_of(m)
            for r in [r for r, (p, _) in parts.items() if r != rank and
                      abs(taken_of(p) - before) <= abs(taken_of(p) - now)]:
                del parts[r]
            log.info("%s step %d is made again: the other ranks' parts of it made before are forgotten",
                     key[0], key[1])
        parts[rank] = (m, node)
        self._parts[key] = parts
        steps = list(dict.fromkeys(k[1] for k in self._parts if k[0] == key[0]))  # (heard of last: last)
        for gone in steps[:-KEEP_STEPS]:
            for k in [k for k in self._parts if k[0] == key[0] and k[1] == gone]:
                del self._parts[k]
        while len(self._parts) > KEEP_ALL:  # (the step heard of least recently first)
            del self._parts[next(iter(self._parts))]

    def committed(self, job: str, step: int) -> bool:
        """Whether every rank's part of ``step`` is durable on some node (announced, or made here)."""
        with self._lock:
            return any(len(ranks) == k[2] for k, ranks in self._parts.items() if k[0] == job and k[1] == step)

    def known(self, job: str, step: int, world_size: int, run: str) -> dict[int, Manifest]:
        with self._lock:
            return {r: m for r, (m, _) in self._parts.get((job, step, world_size, run), {}).items()}

    def mine(self, job: str, step: int, world_size: int, run: str, rank: int, node: str, m: Manifest) -> None:
        """Record a part made on this node, or a single process's snapshot (for ``steps``)."""
        with self._lock:
            self._record((job, step, world_size, run), rank, m, node, mine=True)

    def steps(self, newest: int = 3) -> dict[tuple[str, int, int], dict[str, set[int]]]:
        """The newest steps of each job: which node has which ranks' parts on its disk."""
        with self._lock:
            items = list(self._parts.items())
        out: dict[tuple[str, int, int], dict[str, set[int]]] = {}
        for (job, step, world, _), ranks in items:
            for r, (_, node) in ranks.items():
                out.setdefault((job, step, world), {}).setdefault(node, set()).add(r)
        keep: dict[str, list[int]] = {}
        for job, step, _ in out:  # (in the order heard of: the last are the newest)
            keep.setdefault(job, []).append(step)
        return {k: v for k, v in out.items() if k[1] in list(dict.fromkeys(keep[k[0]]))[-newest:]}

    def try_commit(self, w: Waiting) -> None:
        """On the rank-commits thread, for each part waiting: commit its step if it can be."""
        task, d = w.task, w.delivery
        known = self.known(self.job_path(d.job.path), d.step, d.world_size, d.run)
        if not known:
            return
        need = set(range(d.world_size)) - set(known)
        try:
            here = {int(m.group(1)) for n in os.listdir(d.pending) if (m := PART_DIR_RE.match(n))}
            if need and not need <= here:
                return
        except FileNotFoundError:  # (committed meanwhile: the pending directory went into place)
            return
        commit_known(d, known, self._retention(task))
