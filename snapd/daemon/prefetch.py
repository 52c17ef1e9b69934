"""A rank's part brought to this node when the rank says hello, before it asks to restore; for a
single process, its job's newest snapshot that another node holds a copy of.

On a replacement node (an empty disk), or a node a rank moved to, ``client.restore()`` waits while
its part crosses the peer links, which CurveZMQ's encryption bounds (docs/peers.md, "Measured").
A trainer's startup between ``connect()`` and ``restore()`` (the process group, building the model)
takes seconds too. ``Prefetch`` lays the two over each other: at the hello of a rank of a job on
several ranks, one thread finds the job's newest complete step (``PartFetch.locate``, which adopts
its global manifest, as the restore would) and, when that step has the rank's world size and its
part is not on this node, brings it (``PartFetch.fetch``, checked chunk by chunk). The restore's own
fetch of that part waits for this one rather than starting another (``PartFetch``'s parts in
flight), then finds it here. Where the newest step on this node's disk has the ranks' parts (a job
restarted on the nodes it ran on), the peers are not asked. A single process's hello has its job's
newest snapshot that some node holds brought whole and committed here (``locate`` does that), unless
this node's newest step is one of its own snapshots.

A prefetch that fails is logged; the restore tries every source again and reports its own error.
A snapshot never waits on it. Hellos are grouped by job (one survey of the peers for the ranks that
said hello meanwhile), and at most ``MAX_JOBS`` jobs wait: a client that says hello for many job
names delays only prefetching, never a restore (those run on the peers' pool).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import zmq

from snapd.daemon.part_fetch import PartFetch
from snapd.errors import SnapdError
from snapd.format.jobdir import JobDir
from snapd.format.retention import Retention

log = logging.getLogger(__name__)

MAX_JOBS = 64  # jobs whose prefetch waits at once; further hellos bring nothing early


@dataclass
class _Job:
    job_dir: JobDir
    job: str  # as peers name it (snapd.daemon.peer_commits.PartBook.job_path)
    retention: Retention
    world_size: int
    ranks: set[int] = field(default_factory=set)


class Prefetch:
    def __init__(self, fetch: PartFetch) -> None:
        self.fetch = fetch
        self._jobs: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], _Job] = {}  # (job dir, world size) -> its ranks
        self.brought = 0  # parts brought here before their rank asked
        # (a daemon thread: a prefetch under way never holds up the daemon's exit)
        threading.Thread(target=self._work, name="snapd-prefetch", daemon=True).start()

    def hello(self, job_dir: JobDir, job: str, retention: Retention, rank: int, world_size: int) -> None:
        """Rank ``rank`` of ``world_size`` said hello for ``job``: bring its part here, in the
        background, if a peer or the bucket has it and this node does not."""
        key = (str(job_dir.path), world_size)
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.ranks.add(rank)  # (its survey has not started: one serves them all)
                return
            if len(self._waiting) >= MAX_JOBS:
                log.info("%s: %d jobs wait to be prefetched; rank %d's part is brought when it restores",
                         job_dir.path, len(self._waiting), rank)
                return
            self._waiting[key] = _Job(job_dir, job, retention, world_size, {rank})
        self._jobs.put(key)

    def stop(self) -> None:
        self._jobs.put(None)

    def _work(self) -> None:
        while (key := self._jobs.get()) is not None:
            try:
                self._run(key)
            except Exception:  # a bug of ours: the restore still brings the part
                log.exception("prefetching %s failed", key[0])

    def _run(self, key: tuple[str, int]) -> None:
        with self._lock:
            w = self._waiting.pop(key)
        here = self.fetch.surveys.here(w.job)
        newest = max(here.values(), key=lambda s: (s.taken if s.world_size else 0.0, s.step),
                     default=None)  # (taken last, as the restore's locate orders them)
        if newest is not None and (newest.whole if w.world_size == 1 else all(
                any(not e for _, e in newest.sources.get(r, [])) for r in w.ranks)):
            return  # (the ranks' parts of this node's newest step are on its disk: no need to ask the peers)
        t0 = time.monotonic()
        try:  # (a single process's snapshot found on another node is brought here by this)
            found = self.fetch.locate(w.job_dir, w.job, None, w.retention)
        except (SnapdError, OSError, zmq.ZMQError) as e:
            log.warning("%s: cannot find a step to prefetch (%s); the restore looks again", w.job_dir.path, e)
            return
        step, parts = found["step"], found.get("parts", {})
        if step is None:
            return
        if w.world_size == 1 and len(parts) == 1 and parts["0"][0] != "this node":
            with self._lock:
                self.brought += 1
            log.info("%s step %d prefetched at its hello, from %s in %.2f s", w.job_dir.path, step,
                     parts["0"][0], time.monotonic() - t0)
            return
        if len(parts) != w.world_size:
            log.info("%s: step %d was saved on %d ranks, not %d: a restore reshards it and reads the pieces "
                     "it needs then; nothing prefetched", w.job_dir.path, step, len(parts), w.world_size)
            return
        for rank in sorted(w.ranks):
            if parts.get(str(rank), ["this node"])[0] == "this node":
                continue
            t0 = time.monotonic()
            try:
                got = self.fetch.fetch(w.job_dir, w.job, step, rank)
            except (SnapdError, OSError, zmq.ZMQError) as e:
                log.warning("%s step %d: rank %d's part could not be prefetched (%s); its restore tries "
                            "again", w.job_dir.path, step, rank, e)
                continue
            if got.get("from") != "this node":
                with self._lock:
                    self.brought += 1
                log.info("%s step %d: rank %d's part prefetched at its hello, from %s in %.2f s",
                         w.job_dir.path, step, rank, got["from"], time.monotonic() - t0)
