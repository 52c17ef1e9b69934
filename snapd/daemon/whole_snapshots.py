"""A single process's snapshots among the sources a restore's survey found (snapd.daemon.part_fetch):
which one to resume from, and bringing it here whole.

A job on one process (world size 1) has each snapshot copied whole to its replica holders once it
is committed on its node (snapd.daemon.replication: rank 0 of 1, its manifest naming no part). The
one to resume from is the one taken last, as the job's index orders ``latest`` (a run resumed from
an earlier step takes lower steps later: those are its newest), not the highest step. Copies of a
step are told apart by their manifest's checksum: two runs may each have made a step N. The chosen
copy is brought into a temporary directory of the job from the fastest source (snapd.daemon.
part_download, every chunk checked) and committed by the format's rule (snapd.format.spread_commit.
adopt_whole); a copy that fails is logged and the next source of the same snapshot is tried.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from snapd.daemon.part_download import Download
from snapd.errors import SnapdError, SnapshotNotFound
from snapd.format.jobdir import JobDir, snapshot_name
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.retention import Retention
from snapd.format.spread_commit import adopt_whole

log = logging.getLogger(__name__)

HERE = ""  # a copy's endpoint: this node's own disk


@dataclass(frozen=True, order=True)
class Copy:
    """One source of a single process's snapshot."""

    speed: int  # (the order sources are tried in: snapd.daemon.job_survey.SPEED)
    endpoint: str
    checksum: str  # its manifest's
    taken: float  # when its state was handed over


def newest_first(steps: dict[int, list[Copy]], want: int | None = None) -> list[tuple[int, list[Copy]]]:
    """The single process's snapshots among ``steps``' copies (only step ``want``'s, if given), the
    one taken last first, each with its copies fastest first."""
    versions: dict[tuple[int, str], list[Copy]] = {}
    for step, copies in steps.items():
        if want is None or step == want:
            for c in copies:
                versions.setdefault((step, c.checksum), []).append(c)
    ordered = sorted(versions.items(), key=lambda v: (max(c.taken for c in v[1]), v[0][0]), reverse=True)
    return [(step, sorted(copies)) for (step, _), copies in ordered]


def bring(download: Download, alone: Callable[[tuple[str, int, int]], contextlib.AbstractContextManager],
          job_dir: JobDir, job: str, step: int, copies: list[Copy], retention: Retention) -> tuple[str, int]:
    """Make the snapshot of ``copies`` committed on this node: where it came from (``this node``
    where it is here already) and the bytes brought."""
    final = job_dir.path / snapshot_name(step)
    with alone((job, step, -1)):  # (the hello's prefetch and the restore: one brings it)
        if any(c.endpoint == HERE for c in copies) or (final / MANIFEST_NAME).exists():
            return "this node", 0
        job_dir.open_for_write()  # (a replacement node: the job's directory may not be there yet)
        errors = []
        for c in copies:
            try:
                t0 = time.monotonic()
                tmp, m, n = download.into_tmp(job_dir, job, step, 0, c.endpoint, c.checksum, whole=True)
                t1 = time.monotonic()
                try:
                    adopt_whole(job_dir, tmp, m, retention, c.endpoint)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                log.info("%s step %d (%d MiB) came from %s in %.2f s (%.2f s of it its commit)", job, step,
                         n >> 20, c.endpoint, time.monotonic() - t0, time.monotonic() - t1)
                return c.endpoint, n
            except (SnapdError, OSError, zmq.ZMQError) as e:
                errors.append(f"{c.endpoint}: {e}")
                log.warning("%s step %d from %s unusable (%s); trying the next source", job, step, c.endpoint,
                            e)
    raise SnapshotNotFound(f"{job} step {step} is on no node that answers ({'; '.join(errors)})")
