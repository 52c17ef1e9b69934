"""What became of a rank's delivered part (snapd.format.global_commit), read from the filesystem.

Any rank of any node asks, without the job's lock: its step is committed (the global manifest in
``step-<step>`` names its part's checksum), given up (the pending directory holds why), or still
waiting for the ranks whose parts are not in the pending directory yet.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from snapd.errors import FormatError
from snapd.format.global_manifest import PART_DIR_RE, GlobalManifest, parse_any
from snapd.format.jobdir import FAILED_NAME, JobDir, pending_name, snapshot_name
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.writer import Committed


@dataclass
class Delivery:
    """A rank's part delivered: committed with it (the last part), or waiting for ``missing``."""

    job: JobDir
    step: int
    rank: int
    world_size: int
    run: str
    checksum: str
    committed: Committed | None = None
    missing: list[int] = field(default_factory=list)

    @property
    def pending(self) -> Path:
        return self.job.path / pending_name(self.step, self.world_size, self.run)


@dataclass
class Outcome:
    state: str  # "committed", "failed" or "waiting"
    detail: str = ""  # the snapshot's path, why it failed, or the ranks still missing
    missing: list[int] = field(default_factory=list)


def outcome(d: Delivery, count: bool = True) -> Outcome:
    """What became of a delivered part's step (any thread, no lock: read from the filesystem). With
    ``count``, a step still waiting says which ranks are missing (a listing of the pending
    directory: asked now and then, not on every look)."""
    committed = _committed(d)
    if committed is not None:
        return committed
    reason = failed_reason(d.pending)
    if reason is not None:
        return Outcome("failed", reason)
    try:
        missing = sorted(set(range(d.world_size)) - ranks_delivered(d.pending)) if count else None
        if missing is None and not d.pending.is_dir():
            raise FileNotFoundError(d.pending)
    except FileNotFoundError:  # (renamed into place between the two looks, or removed)
        return _committed(d) or Outcome("failed", "its pending parts were removed")
    return Outcome("waiting", f"ranks {ranges(missing)}" if missing else "", missing or [])


def _committed(d: Delivery) -> Outcome | None:
    path = d.job.path / snapshot_name(d.step)
    checksums = _part_checksums(path / MANIFEST_NAME)
    if checksums is not None and len(checksums) == d.world_size and checksums[d.rank] == d.checksum:
        return Outcome("committed", str(path))
    return None


def _part_checksums(path: Path) -> tuple[str, ...] | None:
    """The parts' checksums of the global manifest at ``path`` (None: none there, or not global).
    Every waiting rank of a node looks at the same manifest, whose size grows with the ranks: it is
    parsed once per version (the open file's identity), not once per rank (bench: 1024 ranks spent
    most of their commit parsing it 1024 times)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        key = (str(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with _SEEN_LOCK:  # (held while parsing: the node's other ranks wait for this parse)
            if key in _SEEN:
                return _SEEN[key]
            if not stat.S_ISREG(st.st_mode):
                return None
            try:
                m = parse_any(_read_fd(fd), str(path))
            except (OSError, FormatError):
                return None
            out = tuple(p["checksum"] for p in m.parts) if isinstance(m, GlobalManifest) else None
            if len(_SEEN) >= 64:
                _SEEN.pop(next(iter(_SEEN)))
            _SEEN[key] = out
            return out
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def ranks_delivered(pend: Path) -> set[int]:
    return {int(m.group(1)) for n in os.listdir(pend) if (m := PART_DIR_RE.match(n))}


def failed_reason(pend: Path) -> str | None:
    try:
        return (pend / FAILED_NAME).read_text(errors="replace")[:2000]
    except (FileNotFoundError, NotADirectoryError):
        return None


def ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


# (the few manifests lately seen by ``_part_checksums``: filled as ranks look, never read at import)
_SEEN: dict[tuple, tuple[str, ...] | None] = {}
_SEEN_LOCK = threading.Lock()
