"""The jobs under a snapshot root: ``ROOT/<job>``, and with per-user directories (a daemon serving
several users) ``ROOT/<user>/<job>``, named ``user/job``, as the remote tier names them.

``snapd ls`` and ``snapd verify`` of a root, the daemon's start (``clean_root``) and its upload
thread all walk a root through here, so each sees the same jobs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from snapd.errors import InvalidArgument, LockTimeout
from snapd.format.job_lock import LOCK_NAME
from snapd.format.jobdir import JOB_NAME_RE, PENDING_RE, SNAPSHOT_RE, TMP_RE, JobDir, check_job_name

log = logging.getLogger(__name__)


def jobs(root: Path) -> dict[str, JobDir]:
    """Every job under ``root`` by name (``job``, or ``user/job`` in a per-user directory), sorted.
    A directory that cannot be listed adds nothing (``listable`` says whether ``root`` can be)."""
    out = {}
    for path in _subdirs(root):
        if _is_job(path):
            out[path.name] = JobDir(root, path.name)
        else:  # a per-user directory (one level: a job's own directories are never jobs)
            out.update({f"{path.name}/{p.name}": JobDir(path, p.name) for p in _subdirs(path) if _is_job(p)})
    return dict(sorted(out.items()))


def job_dirs(root: Path) -> list[JobDir]:
    return list(jobs(root).values())


def job_at(root: Path, name: str) -> JobDir:
    """The job ``name`` (``job`` or ``user/job``, as ``jobs`` names them) under ``root``."""
    user, _, job = name.rpartition("/")
    try:
        if user:
            check_job_name(user)  # (a user's directory follows the job names' rule: no '..', no '/')
        return JobDir(root / user if user else root, job)
    except InvalidArgument:
        raise InvalidArgument(f"invalid job name {name!r}: JOB, or USER/JOB in a root with per-user "
                              "directories (each 1-128 letters, digits, '.', '_' or '-')") from None


def listable(root: Path) -> bool:
    """Whether ``root``'s entries can be read (a daemon serving several users makes its root
    traversable, not listable, to them: each names their own directory, ``ROOT/<user>``)."""
    try:
        with os.scandir(root):
            return True
    except PermissionError:
        return False


def clean_root(root: Path) -> None:
    """Remove what dead writers left in every job under ``root``: a daemon killed mid-flush leaves a
    temporary directory up to a snapshot's size, which would otherwise stay until that job flushes
    again."""
    for jd in job_dirs(root):
        if any(TMP_RE.match(n) or n.startswith((".trash-", ".pending-")) for n in os.listdir(jd.path)):
            try:
                jd.remove_leftovers(stale=True)
            except (OSError, LockTimeout) as e:
                log.warning("%s: leftovers not removed: %s", jd.path, e)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)
                and JOB_NAME_RE.match(e.name)]
    except OSError:
        return []


def _is_job(path: Path) -> bool:
    """A job's directory: its lock file, its index or a snapshot (a per-user directory has none)."""
    if (path / LOCK_NAME).exists() or (path / "index.json").exists():
        return True
    try:
        return any(SNAPSHOT_RE.match(n) or PENDING_RE.match(n) for n in os.listdir(path))
    except OSError:
        return False
