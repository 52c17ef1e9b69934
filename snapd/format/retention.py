"""Which snapshots of a job are kept: the rules (``Retention``), applied under the job lock once a
snapshot is committed (``tidy``), again once held snapshots are uploaded (``prune``), and a user's
removal of one step (``remove_step``). Retention only renames snapshots out of sight under the lock;
their files go after it, so the job's other writers need not wait for the deletion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from snapd.format import index as jobindex
from snapd.format.jobdir import JobDir, snapshot_name
from snapd.format.manifest import taken_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Retention:
    keep_last: int | None = 5
    keep_every_steps: int | None = None
    best: tuple[str, str] | None = None
    # snapshots retention must leave for now (the daemon's uploads not yet in the remote tier)
    hold: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        jobindex.check_retention(self.keep_last, self.keep_every_steps)
        jobindex.check_best(self.best)


def tidy(job: JobDir, index: jobindex.JobIndex, entry: jobindex.Entry, retention: Retention) -> list[Path]:
    """Record a committed snapshot in the index and apply retention (under the job lock): what
    retention takes is renamed out of sight, and returned to be removed after the lock.

    A failure here (the disk full while rewriting the index) leaves the snapshot committed: it is
    logged, not reported as a failed commit, and readers rebuild the index from the manifests."""
    latest = index.latest
    if latest is not None and latest.order > entry.order:
        log.warning("%s: step %d was taken before the latest, step %d, which stays latest",
                    job.path, entry.step, latest.step)
    index.record(entry)
    if retention.best is not None:
        index.best_metric = retention.best
    trash: list[Path] = []
    try:
        for old in jobindex.to_delete(index, retention.keep_last, retention.keep_every_steps):
            if old.name in retention.hold:
                log.debug("%s: step %d waits for its upload before retention removes it", job.path, old.step)
                continue
            log.info("%s: retention removes step %d", job.path, old.step)
            trash += [p for p in [job.trash(old.name)] if p is not None]
            index.history.remove(old)
        jobindex.save(job, index)
    except OSError as e:
        log.error("%s: step %d is committed, but the index was not updated (%s); readers rebuild "
                  "it from the snapshot manifests", job.path, entry.step, e)
    return trash


def prune(job: JobDir, retention: Retention) -> None:
    """Apply retention again, with no new snapshot (after a held snapshot's upload)."""
    with job.lock():
        index = jobindex.load(job)
        trash: list[Path] = []
        for old in jobindex.to_delete(index, retention.keep_last, retention.keep_every_steps):
            if old.name not in retention.hold:
                log.info("%s: retention removes step %d (uploaded)", job.path, old.step)
                trash += [p for p in [job.trash(old.name)] if p is not None]
                index.history.remove(old)
        if trash:
            jobindex.save(job, index)
    job.remove(trash)


def remove_step(job: JobDir, step: int) -> float | None:
    """Remove snapshot ``step`` of ``job`` at its user's request (``Client.remove``, ``snapd rm``, a
    framework's own retention, as Lightning's ``remove_checkpoint``): when it was taken, or None if it
    was not there. The index remembers it removed, so that a restore does not bring its copies on
    other nodes back (snapd.daemon.survey_steps)."""
    with job.lock():
        index = jobindex.load(job)
        entry = index.find(step)
        trash = [p for p in [job.trash(snapshot_name(step))] if p is not None]
        if entry is not None:
            index.forget(entry)
            jobindex.save(job, index)
    job.remove(trash)
    if entry is not None:
        log.info("%s: step %d removed at its user's request", job.path, step)
    return taken_of(entry) if entry is not None else None
