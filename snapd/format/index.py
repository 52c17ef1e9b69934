"""The job index (``index.json``): which snapshot is latest, which is best,
and the history in commit order (the role of TensorFlow's ``checkpoint``
file).

The index is a cache of what the snapshot directories say: each load
reconciles it with the directories on disk, so a crash between installing a
snapshot and rewriting the index loses nothing, and a lost or corrupt index
is rebuilt from the manifests (each manifest records the job's best rule, so
the best mark survives too). Every update is written to a temporary file,
fsynced and renamed over the old one, under the job lock.

``latest`` is the snapshot taken last (handed to the daemon, or saved), not
the one committed last: an emergency snapshot that jumped the daemon's queue
stays the resume point when older snapshots queued behind it commit after it,
and a run resumed from an earlier step makes its new snapshots latest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from snapd.errors import FormatError, InvalidArgument
from snapd.format.jobdir import JobDir, fsync_dir, read_regular, snapshot_name
from snapd.format.global_manifest import GlobalManifest, parse_any
from snapd.format.manifest import MANIFEST_NAME, Manifest, taken_of

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
    taken_unix_s: float | None = None  # when the state was handed over (None: written before it was recorded)

    @classmethod
    def of(cls, m: Manifest | GlobalManifest) -> Entry:
        return cls(m.step, snapshot_name(m.step), m.created_unix_s, m.raw_bytes, m.stored_bytes,
                   dict(m.metrics), m.emergency, m.taken_unix_s)

    @property
    def order(self) -> tuple[float, int]:
        """When the snapshot was taken (its commit time where that is not recorded), then its step."""
        return taken_of(self), self.step


def check_best(best: object) -> tuple[str, str] | None:
    """Validate a ``best=("metric", "min"|"max")`` option."""
    if best is None:
        return None
    if (not isinstance(best, (tuple, list)) or len(best) != 2 or not isinstance(best[0], str)
            or best[1] not in ("min", "max")):
        raise InvalidArgument(f"best must be (metric_name, 'min' or 'max'), got {best!r}")
    return best[0], best[1]


MAX_REMOVED = 64  # the steps a user removed that the index remembers (their copies elsewhere stay gone)


@dataclass
class JobIndex:
    history: list[Entry] = field(default_factory=list)  # commit order, oldest first
    best_metric: tuple[str, str] | None = None
    # steps a user removed (step -> when the removed snapshot was taken): a copy of that making on
    # another node or in the bucket is not brought back by a restore (snapd.format.retention)
    removed: dict[int, float] = field(default_factory=dict)

    def forget(self, entry: Entry) -> None:
        """Remove ``entry`` at its user's request, and remember that its making is gone."""
        self.history.remove(entry)
        self.removed[entry.step] = taken_of(entry)
        while len(self.removed) > MAX_REMOVED:
            del self.removed[min(self.removed, key=self.removed.__getitem__)]

    @property
    def latest(self) -> Entry | None:
        return max(self.history, key=lambda e: e.order) if self.history else None

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
        if self.removed:  # (absent otherwise: an index without removals reads as before)
            body["removed"] = [[n, t] for n, t in sorted(self.removed.items())]
        body["checksum"] = xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode())
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"


def _score(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _entry(e: object) -> Entry:
    if not isinstance(e, dict):
        raise FormatError(f"history entry {e!r} is not an object")
    entry = Entry(**e)
    ints = (entry.step, entry.raw_bytes, entry.stored_bytes)
    if (not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)
            or entry.name != snapshot_name(entry.step) or not isinstance(entry.metrics, dict)
            or not isinstance(entry.created_unix_s, (int, float)) or not isinstance(entry.emergency, bool)
            or not isinstance(entry.taken_unix_s, (int, float, type(None)))):
        raise FormatError(f"history entry for {entry.name!r} is malformed")
    return entry


def parse_index(raw: bytes) -> JobIndex:
    """Parse index bytes; anything but a well-formed index raises ``FormatError`` naming why."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("magic") != INDEX_MAGIC:
        raise FormatError("not a snapd index (no object with the index magic)")
    check = body.pop("checksum", None)
    if check != xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode()):
        raise FormatError("index checksum mismatch")
    try:
        history = [_entry(e) for e in body["history"]]
        best = check_best(body.get("best_metric")) if body.get("best_metric") else None
        removed = {n: float(t) for n, t in body.get("removed", [])}
    except (KeyError, TypeError, ValueError, InvalidArgument) as e:
        raise FormatError(f"malformed index ({type(e).__name__}: {e})") from None
    if len({e.step for e in history}) != len(history):
        raise FormatError("index lists a step twice")
    if any(type(n) is not int or n < 0 or not math.isfinite(t) for n, t in removed.items()):
        raise FormatError("index lists a removed step that is not a step and a time")
    return JobIndex(history, best, removed)


def removed_of(job_path: Path) -> dict[int, float]:
    """The steps a user removed from the job at ``job_path`` (its index; none if it has none)."""
    try:
        return parse_index(read_regular(job_path / INDEX_NAME)).removed
    except (OSError, FormatError):
        return {}


def _has_manifest(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path / MANIFEST_NAME, follow_symlinks=False).st_mode)
    except OSError:
        return False


def load(job: JobDir) -> JobIndex:
    """The job's index, reconciled with the snapshot directories on disk: a directory
    without a manifest is never listed, one the index lacks is added from its manifest."""
    index = JobIndex()
    try:
        index = parse_index(read_regular(job.path / INDEX_NAME))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("%s: index unreadable (%s); rebuilding it from the snapshot manifests", job.path, e)
    except FormatError as e:
        log.warning("%s: index unusable (%s); rebuilding it from the snapshot manifests", job.path, e)
    on_disk = {step: path for step, path in job.snapshot_dirs().items() if _has_manifest(path)}
    index.history = [e for e in index.history if e.step in on_disk]
    known = {e.step for e in index.history}
    found: list[tuple[Entry, Manifest | GlobalManifest]] = []
    for step, path in on_disk.items():
        if step in known:
            continue
        try:
            m = parse_any(read_regular(path / MANIFEST_NAME), str(path / MANIFEST_NAME))
        except (OSError, FormatError) as e:
            log.warning("%s: not listed: %s", path, e)
            continue
        found.append((Entry.of(m), m))
    # snapshots the index did not know about were committed after it was written
    found.sort(key=lambda f: f[0].created_unix_s)
    index.history.extend(e for e, _ in found)
    if index.best_metric is None:  # a rebuilt index: the newest manifest that names the rule has it
        rules = [m for _, m in found if m.best_metric is not None]
        if rules:
            index.best_metric = max(rules, key=lambda m: Entry.of(m).order).best_metric
    return index


def problems(job: JobDir) -> tuple[list[str], list[str]]:
    """What is wrong with the job's index file (``snapd verify``): damage (unreadable, not an
    index, failing its checksum), then notes: out of step with the snapshot directories, as a
    crash between a commit's rename and its index update leaves it. Readers repair both."""
    try:
        index = parse_index(read_regular(job.path / INDEX_NAME))
    except FileNotFoundError:
        missing = [f"{job.path / INDEX_NAME}: missing (rebuilt from the manifests)"]
        return [], missing if job.snapshot_dirs() else []
    except (OSError, FormatError) as e:
        return [f"{job.path / INDEX_NAME}: {e} (rebuilt from the manifests when read)"], []
    on_disk = {s for s, p in job.snapshot_dirs().items() if _has_manifest(p)}
    listed = {e.step for e in index.history}
    notes = [f"{job.path / INDEX_NAME}: lists step {s}, which has no committed directory"
             for s in sorted(listed - on_disk)]
    notes += [f"{job.path / INDEX_NAME}: does not list step {s} (added when read)" for s in sorted(on_disk
                                                                                                   - listed)]
    return [], notes


def latest_raw_bytes(job_path: Path, rank: int = 0, world_size: int = 1) -> int | None:
    """The tensor bytes rank ``rank`` of ``world_size`` is likely to hand over next, from the job's
    latest snapshot as its index file records it, without reconciling with the directories (a hint
    for sizing buffers: None when there is no readable index, or no snapshot in it). A rank of the
    world that took it gets its own part's size (ranks differ: ``per_rank`` state, rank 0's extra);
    another world size (the job resharded) an equal share of the whole. Not the whole: each node's
    daemon holds its own ranks' parts, and a buffer per rank sized for the job was world_size times
    too large."""
    try:
        latest = parse_index(read_regular(job_path / INDEX_NAME)).latest
    except (OSError, FormatError):
        return None
    if latest is None:
        return None
    if world_size > 1:
        try:  # (the global manifest's parts; the index has only the sum)
            body = json.loads(read_regular(job_path / latest.name / MANIFEST_NAME))
            parts = body["parts"] if body.get("world_size") == world_size else None
            if isinstance(parts, list) and len(parts) == world_size and 0 <= rank < world_size:
                own = parts[rank]["raw_bytes"]
                if type(own) is int and own >= 0:
                    return own
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # (a hint: the share below)
    return -(-latest.raw_bytes // max(1, world_size))


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
    """Snapshots the retention policy lets go: not among the ``keep_last`` taken last (so
    never ``latest``), not on a ``keep_every_steps`` boundary, and not the best."""
    keep = set()
    if keep_last is None:
        return []
    keep.update(e.step for e in sorted(index.history, key=lambda e: e.order)[-keep_last:])
    if keep_every_steps:
        keep.update(e.step for e in index.history if e.step % keep_every_steps == 0)
    if index.best is not None:
        keep.add(index.best.step)
    return [e for e in index.history if e.step not in keep]


def check_retention(keep_last: object, keep_every_steps: object) -> None:
    for name, v in (("keep_last", keep_last), ("keep_every_steps", keep_every_steps)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidArgument(f"{name} must be None or an integer >= 1, got {v!r}")
