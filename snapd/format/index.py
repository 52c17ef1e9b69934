"""The job index (``index.json``): which snapshot is latest, which is best,
and the history in commit order (the role of TensorFlow's ``checkpoint``
file).

The index is a cache of what the snapshot directories say: each load
reconciles it with the directories on disk, so a crash between installing a
snapshot and rewriting the index loses nothing, and a lost or corrupt index
is rebuilt from the manifests. Every update is written to a temporary file,
fsynced and renamed over the old one, under the job lock.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from snapd.errors import FormatError, InvalidArgument
from snapd.format.jobdir import JobDir, fsync_dir, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_MAGIC = "snapd-index"


@dataclass
class Entry:
    step: int
    name: str
    created_unix_s: float
    raw_bytes: int
    stored_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    emergency: bool = False

    @classmethod
    def of(cls, m: Manifest) -> Entry:
        return cls(m.step, snapshot_name(m.step), m.created_unix_s, m.raw_bytes, m.stored_bytes,
                   dict(m.metrics), m.emergency)


def check_best(best: object) -> tuple[str, str] | None:
    """Validate a ``best=("metric", "min"|"max")`` option."""
    if best is None:
        return None
    if (not isinstance(best, (tuple, list)) or len(best) != 2 or not isinstance(best[0], str)
            or best[1] not in ("min", "max")):
        raise InvalidArgument(f"best must be (metric_name, 'min' or 'max'), got {best!r}")
    return best[0], best[1]


@dataclass
class JobIndex:
    history: list[Entry] = field(default_factory=list)  # commit order, oldest first
    best_metric: tuple[str, str] | None = None

    @property
    def latest(self) -> Entry | None:
        return self.history[-1] if self.history else None

    @property
    def best(self) -> Entry | None:
        if self.best_metric is None:
            return None
        name, mode = self.best_metric
        scored = [e for e in self.history if _score(e.metrics.get(name)) is not None]
        if not scored:
            return None
        pick = min if mode == "min" else max
        # ties go to the most recent snapshot
        return pick(reversed(scored), key=lambda e: _score(e.metrics[name]))

    def find(self, step: int) -> Entry | None:
        return next((e for e in self.history if e.step == step), None)

    def record(self, entry: Entry) -> None:
        self.history = [e for e in self.history if e.step != entry.step] + [entry]

    def to_bytes(self) -> bytes:
        body = {"magic": INDEX_MAGIC, "format_version": 1,
                "latest": self.latest.step if self.latest else None,
                "best": self.best.step if self.best else None,
                "best_metric": list(self.best_metric) if self.best_metric else None,
                "history": [asdict(e) for e in self.history]}
        body["checksum"] = xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode())
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"


def _score(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _parse(raw: bytes) -> JobIndex:
    body = json.loads(raw)
    if body.get("magic") != INDEX_MAGIC:
        raise FormatError("not a snapd index")
    check = body.pop("checksum", None)
    if check != xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode()):
        raise FormatError("index checksum mismatch")
    return JobIndex([Entry(**e) for e in body["history"]],
                    tuple(body["best_metric"]) if body.get("best_metric") else None)


def load(job: JobDir) -> JobIndex:
    """The job's index, reconciled with the snapshot directories on disk."""
    index = JobIndex()
    try:
        index = _parse((job.path / INDEX_NAME).read_bytes())
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: index unreadable (%s); rebuilding it from the snapshot manifests", job.path, e)
    on_disk = job.snapshot_dirs()
    index.history = [e for e in index.history if e.step in on_disk]
    known = {e.step for e in index.history}
    found = []
    for step, path in on_disk.items():
        if step in known:
            continue
        try:
            found.append(Entry.of(parse((path / MANIFEST_NAME).read_bytes(), str(path / MANIFEST_NAME))))
        except (OSError, FormatError) as e:
            log.warning("%s: not listed: %s", path, e)
    # snapshots the index did not know about were committed after it was written
    index.history.extend(sorted(found, key=lambda e: (e.created_unix_s, e.step)))
    return index


def latest_raw_bytes(job_path: Path) -> int | None:
    """The tensor bytes of the job's latest snapshot as its index file records them, without
    reconciling with the directories (a hint for sizing buffers: None when there is no readable
    index, or no snapshot in it)."""
    try:
        latest = _parse((job_path / INDEX_NAME).read_bytes()).latest
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return latest.raw_bytes if latest is not None else None


def save(job: JobDir, index: JobIndex) -> None:
    """Atomically replace the index file (call under the job lock)."""
    tmp = job.path / f".{INDEX_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(index.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, job.path / INDEX_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(job.path)


def to_delete(index: JobIndex, keep_last: int | None, keep_every_steps: int | None) -> list[Entry]:
    """Snapshots the retention policy lets go: not among the ``keep_last`` most
    recent, not on a ``keep_every_steps`` boundary, and not the best."""
    keep = set()
    if keep_last is None:
        return []
    keep.update(e.step for e in index.history[-keep_last:])
    if keep_every_steps:
        keep.update(e.step for e in index.history if e.step % keep_every_steps == 0)
    if index.best is not None:
        keep.add(index.best.step)
    return [e for e in index.history if e.step not in keep]


def check_retention(keep_last: object, keep_every_steps: object) -> None:
    for name, v in (("keep_last", keep_last), ("keep_every_steps", keep_every_steps)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidArgument(f"{name} must be None or an integer >= 1, got {v!r}")


def path_of(job: JobDir, entry: Entry) -> Path:
    return job.path / entry.name
