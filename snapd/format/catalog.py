"""What snapshots a job has: listing them and resolving ``latest``/``best``/a step."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapd.errors import FormatError, InvalidArgument, SnapshotNotFound, VersionError
from snapd.format import index as jobindex
from snapd.format.jobdir import JobDir, read_regular
from snapd.format.global_manifest import parse_any
from snapd.format.manifest import MANIFEST_NAME, taken_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotInfo:
    step: int
    path: Path
    created_unix_s: float
    raw_bytes: int
    stored_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    latest: bool = False
    best: bool = False
    emergency: bool = False
    taken_unix_s: float | None = None  # when its state was handed over (None: before this was recorded)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def order(self) -> tuple[float, int]:
        """What orders a job's snapshots, as ``latest`` does: when taken (else committed), then step."""
        return taken_of(self), self.step


def list_snapshots(root: str | os.PathLike, job: str) -> list[SnapshotInfo]:
    """The job's committed snapshots, in the order they were taken (the order ``latest`` follows:
    the last listed is latest), with latest/best marks. Not commit order: an emergency snapshot
    committed ahead of older ones still in flight comes after them."""
    jd = JobDir(root, job)
    if not jd.path.is_dir():
        raise SnapshotNotFound(f"no job {job!r} under {root}")
    idx = jobindex.load(jd)
    latest, best = idx.latest, idx.best
    return [SnapshotInfo(e.step, jd.path / e.name, e.created_unix_s, e.raw_bytes, e.stored_bytes,
                         dict(e.metrics), e is latest, e is best, e.emergency, e.taken_unix_s)
            for e in sorted(idx.history, key=lambda e: e.order)]


def resolve(root: str | os.PathLike, job: str, step: int | str | None = "latest") -> Path:
    """The directory of snapshot ``step``: an int, ``"latest"`` (default) or ``"best"``."""
    jd = JobDir(root, job)
    if step is None:
        step = "latest"
    if isinstance(step, bool) or not isinstance(step, (int, str)) or \
            (isinstance(step, str) and step not in ("latest", "best")) or (isinstance(step, int) and step
                                                                           < 0):
        raise InvalidArgument(f"step must be an int >= 0, 'latest' or 'best', got {step!r}")
    if not jd.path.is_dir():
        raise SnapshotNotFound(f"no job {job!r} under {root}")
    idx = jobindex.load(jd)
    if step == "latest":
        entry = _newest_valid(jd, idx)
    elif step == "best":
        if idx.best_metric is None:
            raise SnapshotNotFound(f"job {job!r} tracks no best snapshot (save with best=(metric, "
                                   "'min'|'max'))")
        entry = idx.best
    else:
        entry = idx.find(step)
    if entry is None:
        have = ", ".join(str(e.step) for e in idx.history) or "none"
        raise SnapshotNotFound(f"job {job!r} under {root} has no snapshot {step!r} (steps: {have})")
    return jd.path / entry.name


def _newest_valid(jd: JobDir, idx: jobindex.JobIndex) -> jobindex.Entry | None:
    """The snapshot taken last whose manifest parses: a damaged newest snapshot must not stop
    a resume when an older one is whole (it is logged, and ``snapd verify`` reports it)."""
    for entry in sorted(idx.history, key=lambda e: e.order, reverse=True):
        path = jd.path / entry.name / MANIFEST_NAME
        try:
            parse_any(read_regular(path), str(path))
            return entry
        except VersionError:
            raise  # a newer snapd wrote it: falling back would silently resume from an older step
        except (OSError, FormatError) as e:
            log.warning("latest of job %s: skipping step %d: %s", jd.job, entry.step, e)
    return None
