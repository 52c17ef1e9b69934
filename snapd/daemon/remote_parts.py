"""Rank parts that wait for their global snapshot, uploaded ahead of its commit: the nodes of a job
that share no filesystem meet in the bucket.

A rank's part waits (snapd.daemon.rank_commits) until every rank's part is in its step's pending
directory; on nodes with separate disks that never happens. Once a part has waited a little, it is
offered here: the upload thread uploads it to ``step-N/rank-NNNNN/`` in the bucket, then looks
every ``LOOK_EVERY_S`` whether every rank's part is there, and if so commits the global snapshot
from them (snapd.remote.remote_job: the same assembly as a local commit, the manifest last). Once
the bucket holds a global snapshot with this part, the waiting part is done (committed there) and
leaves its pending directory. On a shared filesystem the last rank's part commits locally at once
and is never offered, so no global snapshot is committed twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from snapd.daemon.rank_commits import Waiting
from snapd.errors import SnapdError
from snapd.format.global_manifest import part_dir
from snapd.format.jobdir import snapshot_name
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store

log = logging.getLogger(__name__)

LOOK_EVERY_S = 1.0


@dataclass
class _Part:
    w: Waiting
    uploaded: bool = False
    next_look: float = 0.0
    failures: int = 0


class PartUploads:
    """Owned by the upload thread (``tend``); the rank-commits thread calls ``add``."""

    def __init__(self, store: Store, remote_job: Callable[[Path, str], str], pool: Executor,
                 pace: Callable[[int], None]) -> None:
        self.store, self.remote_job, self.pool, self.pace = store, remote_job, pool, pace
        self._lock = threading.Lock()
        self._parts: list[_Part] = []

    def add(self, w: Waiting) -> None:
        with self._lock:
            self._parts.append(_Part(w))

    def wait_s(self) -> float | None:
        """How long until a part is due a look (None: no part waits)."""
        with self._lock:
            if not self._parts:
                return None
            return max(0.0, min(p.next_look for p in self._parts) - time.monotonic())

    def tend(self) -> None:
        """Upload the parts offered, and look whether their global snapshots can be committed."""
        now = time.monotonic()
        with self._lock:
            due = [p for p in self._parts if p.next_look <= now]
        for p in due:
            if p.w.ended or self._look(p):
                with self._lock:
                    self._parts.remove(p)

    def _look(self, p: _Part) -> bool:
        task, d = p.w.task, p.w.delivery
        rjob = RemoteJob(self.store, self.remote_job(task.root, task.job))
        name = snapshot_name(task.step)
        try:
            if not p.uploaded:
                rjob.upload_part(d.pending / part_dir(task.rank), name, task.rank, self.pool, self.pace)
                p.uploaded = True
                log.info("%s step %d: rank %d's part is in the bucket; the step commits there once every "
                         "rank's is", task.job, task.step, task.rank)
            if rjob.commit_parts(name, task.step, task.world_size, task.run, self.pool) and \
                    rjob.has_part(name, task.rank, d.checksum):
                p.w.remote = rjob.where(name)
                return True
            p.next_look = time.monotonic() + LOOK_EVERY_S
        except (OSError, SnapdError) as e:
            if p.w.ended:  # (committed locally meanwhile: its pending directory went into place)
                return True
            p.failures += 1
            p.next_look = time.monotonic() + min(30.0, 2.0 ** p.failures)
            log.warning("%s step %d: rank %d's part not in the bucket yet: %s", task.job, task.step,
                        task.rank, e)
        return False
