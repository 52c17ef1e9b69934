"""Both tiers as one: which snapshot ``load`` and ``restore`` open when a job has a remote tier,
and ``snapd ls`` of a remote one.

The newest committed snapshot wins wherever it is (taken last, as the index orders ``latest``; at
the same step the local copy, which is faster to read; the bucket's manifests are read only for
steps higher than the local latest); a step asked for by number comes from whichever tier has it;
``best`` is the local index's, else the best of the remote snapshots by the job's rule. A fresh
node with an empty local disk thus resumes from the remote tier. A bucket that does not answer (an
error, or no listing within ``LIST_WAIT_S``) leaves a local snapshot to load, with a warning.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapd.errors import FormatError, InvalidArgument, SnapdError, SnapshotNotFound
from snapd.format import catalog
from snapd.format import index as jobindex
from snapd.format.global_manifest import parse_any
from snapd.format.index import Entry
from snapd.format.jobdir import read_regular
from snapd.format.manifest import MANIFEST_NAME, taken_of
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store, answered_within

log = logging.getLogger(__name__)

LIST_WAIT_S = 10.0  # how long ``latest`` waits for the bucket's listing when a local step can load


def remote_url(remote: str | None) -> str | None:
    """The remote tier asked for: the argument, else ``$SNAPD_REMOTE``, else none."""
    return remote if remote is not None else (os.environ.get("SNAPD_REMOTE") or None)


@dataclass
class Located:
    """A snapshot found in one of the tiers: ``path`` (local) or ``remote`` and ``name``."""

    step: int
    path: Path | None = None
    remote: RemoteJob | None = None
    name: str = ""

    def describe(self) -> str:
        return str(self.path) if self.path is not None else self.remote.where(self.name)  # type: ignore[union-attr]


def _local(root: str | os.PathLike, job: str, step: int | str) -> Located | None:
    try:
        path = catalog.resolve(root, job, step)
    except SnapshotNotFound:
        return None
    return Located(int(path.name.split("-")[1]), path=path)


def _steps(rjob: RemoteJob, wait_s: float | None) -> dict[int, str]:
    """The bucket's committed steps of the job; with ``wait_s``, RemoteError if it has not answered
    by then."""
    return rjob.steps() if wait_s is None else answered_within(rjob.steps, wait_s, rjob.where())


def _remote_best(rjob: RemoteJob) -> Entry | None:
    entries, rule = rjob.entries()
    return jobindex.JobIndex(history=entries, best_metric=rule).best


def locate(root: str | os.PathLike, job: str, step: int | str | None, remote: str) -> Located:
    """Snapshot ``step`` (an int, "latest" or "best") of ``job`` in the local or the remote tier."""
    step = "latest" if step is None else step
    if isinstance(step, bool) or not isinstance(step, (int, str)) or step not in ("latest", "best") and \
            not isinstance(step, int):
        raise InvalidArgument(f"step must be an int >= 0, 'latest' or 'best', got {step!r}")
    local = _local(root, job, step)
    if local is not None and step != "latest":  # (a committed step is the same snapshot in both tiers)
        return local
    try:  # (no boto3 in the trainer's environment, no credentials, the store down: local still loads)
        rjob = RemoteJob(Store.open(remote), job)
        steps = _steps(rjob, None if local is None else LIST_WAIT_S)
    except SnapdError as e:
        if local is None:
            raise
        log.warning("the remote tier is out of reach (%s): loading the local %s", e, local.describe())
        return local
    if isinstance(step, int):
        if local is None and step not in steps:
            raise SnapshotNotFound(f"job {job!r} has no snapshot {step} under {root} or at {rjob.where()}")
        return local or Located(step, remote=rjob, name=steps[step])
    if step == "best" and local is not None:
        return local
    if step == "best":
        best = _remote_best(rjob)
        if best is None:
            raise SnapshotNotFound(f"job {job!r} has no best snapshot under {root} or at {rjob.where()}")
        return Located(best.step, remote=rjob, name=best.name)
    newest = _taken_last(rjob, {s: n for s, n in steps.items() if local is None or s > local.step}, local,
                         jobindex.removed_of(Path(root) / job))
    if newest is not None:
        return newest
    if local is None:
        raise SnapshotNotFound(f"job {job!r} has no snapshots under {root} or at {rjob.where()}")
    return local


def _taken_last(rjob: RemoteJob, higher: dict[int, str], local: Located | None,
                removed: dict[int, float]) -> Located | None:
    """Of the bucket's steps ``higher`` than the local latest, the one taken last, if it was taken
    after the local latest (as the index orders latest: a run that went back to an earlier step takes
    lower steps later, and its abandoned higher steps may still be in the bucket). A snapshot a user
    removed here (``removed``: its step and when it was taken) is not one of them, should its copy in
    the bucket outlive the removal."""
    found = []
    with ThreadPoolExecutor(min(8, max(1, len(higher)))) as pool:  # (a fresh node: every step's manifest)
        raws = list(pool.map(rjob.manifest_bytes, higher.values()))
    for (step, name), raw in zip(higher.items(), raws):
        try:
            m = parse_any(raw, rjob.where(f"{name}/{MANIFEST_NAME}")) if raw is not None else None
        except FormatError as e:
            log.warning("%s", e)
            continue
        if m is not None and not (step in removed and taken_of(m) <= removed[step] + 1e-6):
            found.append(((taken_of(m), step), name))
    if not found:
        return None
    (order, name) = max(found)
    if local is not None and local.path is not None:
        here = parse_any(read_regular(local.path / MANIFEST_NAME), str(local.path))
        if (taken_of(here), local.step) >= order:
            return None
    return Located(order[1], remote=rjob, name=name)


def open_located(where: Located, rank: int | None, fetch_part: Any = None) -> Any:
    from snapd.format.global_reader import open_snapshot
    from snapd.remote.reader import open_remote

    if where.path is not None:
        return open_snapshot(where.path, rank, fetch_part)
    assert where.remote is not None
    return open_remote(where.remote.store, where.remote.job, where.name, rank)
