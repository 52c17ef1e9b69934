"""Retention around the remote tier's uploads (snapd.daemon.uploads): a local snapshot waiting for
its upload is held (local retention leaves it), unless the disk runs short; once uploaded, the
job's local retention runs again without that hold, then the remote one (``remote_keep_last``,
``remote_keep_every_steps``, the best kept) on the bucket. Neither is ever fatal to an upload:
what fails is logged and applied again after the next one.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from snapd.daemon.remote_view import RemoteView
from snapd.errors import SnapdError
from snapd.format import index as jobindex
from snapd.format.jobdir import JobDir
from snapd.format.retention import Retention, prune
from snapd.remote.remote_job import RemoteJob

log = logging.getLogger(__name__)

SPACE_MARGIN = 2  # snapshots' worth of free space below which uploads no longer hold local ones


@dataclass
class Upload:
    """A local snapshot waiting for its upload."""

    root: Path  # the job's root (a user's, with per-user directories)
    job: str
    path: Path  # the committed local snapshot
    step: int
    emergency: bool
    stored_bytes: int
    retention: Retention
    ranks: set[int] | None  # a global snapshot: the ranks this node served (their parts are ours)
    since: float = field(default_factory=time.time)
    attempts: int = 0


def hold(waiting: list[Upload], job_path: Path, next_bytes: int = 0) -> frozenset[str]:
    """The names of ``waiting`` (a job's snapshots still to upload): local retention keeps them,
    unless the disk has less room than ``SPACE_MARGIN`` snapshots of ``next_bytes`` (then retention
    takes them as it would without a remote tier, each named in the log)."""
    if waiting and next_bytes:
        try:
            free = shutil.disk_usage(job_path).free
        except OSError:
            free = None
        if free is not None and free < SPACE_MARGIN * next_bytes:
            for u in waiting:
                log.warning("local space forces retention: %s step %d may be removed before its upload "
                            "(%d bytes free under %s)", u.job, u.step, free, job_path)
            return frozenset()
    return frozenset(u.path.name for u in waiting)


def is_best(u: Upload) -> bool:
    """Whether ``u`` is its job's best snapshot (a full backlog never skips it)."""
    try:
        best = jobindex.load(JobDir(u.root, u.job)).best
    except (OSError, SnapdError):
        return False
    return best is not None and best.name == u.path.name


def retire(u: Upload, rjob: RemoteJob, held: frozenset[str], keep_last: int | None, every: int | None,
           view: RemoteView) -> None:
    """After ``u``'s upload: the job's local retention with ``held`` still kept, then the remote one."""
    job = JobDir(u.root, u.job)
    try:
        prune(job, replace(u.retention, hold=held))
    except (OSError, SnapdError) as e:
        log.warning("%s: local retention after an upload failed: %s", job.path, e)
    if keep_last is None:
        return
    try:
        entries, rule = rjob.entries()
        index = jobindex.JobIndex(history=entries, best_metric=u.retention.best or rule)
        for old in jobindex.to_delete(index, keep_last, every):
            log.info("remote retention removes %s step %d", u.job, old.step)
            rjob.delete(old.step)
            view.forget(rjob.job, old.step)
    except SnapdError as e:  # (the upload stands; the next one applies retention again)
        log.warning("%s: remote retention after an upload failed: %s", u.job, e)
