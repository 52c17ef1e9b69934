"""A part this daemon made, to announce to its peers or replicate to them (snapd.daemon.replication):
what identifies it, what makes one of a rank's parts newer than another, its files opened from
the directory that holds this making of it and read as the messages that carry them, and the files
an incremental part shares with its rank's part of an earlier step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapd.errors import FormatError, SnapdError
from snapd.format.global_manifest import part_dir
from snapd.format.jobdir import SNAPSHOT_RE, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse, taken_of
from snapd.peers import wire


@dataclass
class Outgoing:
    """A rank part to announce or replicate. Its files are in ``job_dir/step-N/rank-r`` once its
    step is committed here, else in its pending directory."""

    job: str  # the job's directory relative to the root
    step: int
    rank: int
    world_size: int
    run: str
    job_dir: Path
    pending: Path
    manifest: bytes
    nbytes: int
    queued: float = field(default_factory=time.monotonic)
    announced: set[str] = field(default_factory=set)  # the peers it was announced to (any thread)
    whole: bool = False  # a single process's snapshot: rank 0 of 1, its files in step-N/ itself
    taken: float = 0.0  # when its state was handed over

    @classmethod
    def of(cls, job: str, job_dir: Path, pending: Path, raw: bytes, m: Manifest) -> Outgoing:
        """The part whose manifest is ``m`` (``raw``): a rank's part as its manifest names it, or a
        single process's snapshot (no part: rank 0 of 1, ``whole``)."""
        part = m.part or {"rank": 0, "world_size": 1, "run": ""}
        return cls(job, m.step, int(part["rank"]), int(part["world_size"]), str(part["run"]), job_dir,
                   pending, raw, sum(int(f["bytes"]) for f in m.files) + len(raw), whole=m.part is None,
                   taken=taken_of(m))

    @property
    def newness(self) -> tuple[float, int]:
        """What makes one of a rank's parts newer than another: when it was taken, as the index
        orders latest (a run resumed from an earlier step takes lower steps later; an emergency
        snapshot, committed ahead of older ones, is newest), then its step."""
        return self.taken, self.step

    @property
    def files_dir(self) -> str:
        """Where its files are in its step's directory."""
        return "" if self.whole else part_dir(self.rank)

    def shared_with(self, m: Manifest, step: int) -> list[tuple[str, str, int]]:
        """The files of this part (``m``, its manifest) an incremental snapshot shares with its
        rank's part of ``step``: (its name, that part's file, bytes)."""
        out = []
        for f in m.files:
            # (shared_from: step-N/rank-R/FILE of a part, step-N/FILE of a single process's snapshot)
            where = str(f.get("shared_from", "")).split("/")
            at = SNAPSHOT_RE.match(where[0]) if len(where) == (2 if self.whole else 3) else None
            if at is not None and int(at.group(1)) == step and (self.whole or
                                                                 where[1] == part_dir(self.rank)):
                out.append((str(f["name"]), where[-1], int(f["bytes"])))
        return out

    def checksum_at(self, step: int) -> str | None:
        """The manifest checksum of this rank's part (a single process's snapshot) of ``step`` on
        this node's disk; None where there is none."""
        try:
            raw = read_regular(self.job_dir / snapshot_name(step) / self.files_dir / MANIFEST_NAME)
            return parse(raw).checksum
        except (OSError, SnapdError):
            return None

    def header(self, t: str, **more: Any) -> dict[str, Any]:
        return {"t": t, "job": self.job, "step": self.step, "rank": self.rank, "world_size": self.world_size,
                "run": self.run, **more}

    def pieces(self, fds: dict[str, int], pace: Callable[[int], None]) -> Iterator[tuple[dict, bytes]]:
        """The bytes of the files ``fds`` as ``replica`` data messages of ``PIECE_BYTES``, each
        read when the link takes it, ``pace`` told its size first (the replication bound)."""
        for name, fd in fds.items():
            size = os.fstat(fd).st_size
            for offset in range(0, size, wire.PIECE_BYTES):
                data = os.pread(fd, min(wire.PIECE_BYTES, size - offset), offset)
                pace(len(data))
                yield self.header("replica", phase="data", file=name, offset=offset), data

    def open_files(self) -> dict[str, int] | None:
        """Descriptors of the part's data files (they stay valid if the directory moves), or None
        when the part is gone (given up, removed by retention). Only from a directory whose
        manifest is this part's: a step made again (the run went back to an earlier step) has the
        first making's files committed under the same names until the new one replaces them."""
        names = [f["name"] for f in parse(self.manifest).files]
        committed = self.job_dir / snapshot_name(self.step)
        for where in (committed, self.pending, committed):  # (it may move from one to the other meanwhile)
            try:
                dfd = os.open(where / self.files_dir, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            fds: dict[str, int] = {}
            try:  # (names in the directory as opened: all of one making, if it moves meanwhile)
                if read_regular(MANIFEST_NAME, dir_fd=dfd) != self.manifest:
                    continue
                for n in names:
                    fds[n] = os.open(n, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                return fds
            except (FileNotFoundError, FormatError):
                for fd in fds.values():
                    os.close(fd)
            finally:
                os.close(dfd)
        return None


def newest_by_rank(parts: Iterable[Outgoing]) -> dict[tuple[str, int], Outgoing]:
    """The newest of ``parts`` of each rank of each job."""
    newest: dict[tuple[str, int], Outgoing] = {}
    for o in parts:
        k = (o.job, o.rank)
        if k not in newest or newest[k].newness < o.newness:
            newest[k] = o
    return newest
