"""The parts this daemon holds for its peers: in memory within a byte budget, else on disk under
``replica_dir`` if it has one, never anywhere else.

A replica is begun with its part's manifest (parsed and checked here: the files it may hold and
their sizes come from it, so a peer can never make this daemon hold more, or write elsewhere),
filled piece by piece, and ended; only ended replicas are served. Per job, the newest step (taken
last, as the index orders latest, not the highest) that is
committed (every rank's part durable on some node, as the part book knows) and whose replicas here
are complete is kept, with anything newer; older steps go. A newer step some rank never finished
thus never takes its older step's replicas with it: that older step is the resume point. A data file
an incremental part shares with its previous step (FORMAT.md section 9) is not sent again: the
sender asks for it to be taken from the replica of that step held here (``link``: the same bytes
in memory, a hard link on disk), and such a file is never written to after. A single process's
snapshot is held as rank 0 of 1 (``whole``: its manifest names no part), once committed on its
node. Whoever
uses a replica checks it chunk by chunk against its manifest first (snapd.daemon.part_fetch): a
byte flipped here is caught there.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from snapd.errors import InvalidArgument, SnapdError
from snapd.format.global_manifest import part_dir
from snapd.format.jobdir import snapshot_name
from snapd.format.manifest import MANIFEST_NAME, parse, taken_of
from snapd.peers import replica_keeping as keeping
from snapd.peers.replica_keeping import Replica

log = logging.getLogger(__name__)


STALE_S = 120.0  # an unfinished copy untouched this long may make room for another


class NoRoom(SnapdError):
    code = "no_room"


class ReplicaStore:
    """Owned by the peer server's thread; ``held`` and ``status`` may be called from any thread."""

    def __init__(self, memory_bytes: int, directory: Path | None = None,
                 committed: Callable[[str, int], bool] = lambda job, step: True) -> None:
        self.memory_bytes, self.directory = memory_bytes, directory
        self.committed = committed  # whether every rank's part of a job's step is durable on some node
        self._parts: dict[tuple[str, int, int], Replica] = {}
        self._lock = threading.Lock()

    def memory_used(self) -> int:
        return sum(r.nbytes for r in self._parts.values() if r.directory is None)

    # -- receiving ------------------------------------------------------------------------
    def begin(self, job: str, step: int, rank: int, world_size: int, run: str, node: str, raw: bytes) -> None:
        m = parse(raw, f"{node}'s part of {job} step {step} rank {rank}")
        whole = m.part is None and (rank, world_size, run) == (0, 1, "")  # (a single process's snapshot)
        part = {"rank": rank, "world_size": world_size, "run": run}
        if m.step != step or not whole and (m.part is None or {k: m.part.get(k) for k in part} != part):
            raise InvalidArgument(f"{job} step {step} rank {rank}: the manifest sent is of another part "
                                  f"({m.part}, step {m.step})")
        r = Replica(job, step, rank, world_size, run, node, bytes(raw), m.checksum or "",
                    {f["name"]: int(f["bytes"]) for f in m.files}, whole=whole, taken=taken_of(m))
        with self._lock:
            self._drop(self._parts.pop((job, step, rank), None))
            self._make_room(r)
            self._parts[(job, step, rank)] = r
        log.info("holding %s step %d rank %d from %s in %s (%d MiB)", job, step, rank, node, r.where,
                 r.nbytes >> 20)

    def write(self, job: str, step: int, rank: int, name: str, offset: int, data: memoryview) -> None:
        r = self._parts.get((job, step, rank))
        if r is None or r.complete:
            raise InvalidArgument(f"{job} step {step} rank {rank}: no replica begun")
        size = r.sizes.get(name)
        if size is None or offset < 0 or offset + len(data) > size or name in r.linked:
            raise InvalidArgument(f"{job} step {step} rank {rank}: {name} [{offset}, +{len(data)}) is not a "
                                  "range of a file of its manifest it may write")
        if r.directory is None:
            buf = r.files.get(name)
            if buf is None:
                buf = r.files[name] = bytearray(size)
            buf[offset:offset + len(data)] = data
        else:
            fd = os.open(r.directory / name, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        r.written.add(name)
        r.received += len(data)
        r.touched = time.monotonic()

    def link(self, job: str, step: int, rank: int, name: str, from_step: int, from_name: str) -> None:
        """File ``name`` of the replica being received is file ``from_name`` of the complete replica
        of step ``from_step`` of the same job and rank held here, of the same size: taken from it,
        not sent. An InvalidArgument (nothing held to take it from) makes the sender send it."""
        r = self._parts.get((job, step, rank))
        src = self._parts.get((job, from_step, rank))
        size = r.sizes.get(name) if r is not None and not r.complete else None
        if size is None or name in r.linked or name in r.written:
            raise InvalidArgument(f"{job} step {step} rank {rank}: no file {name} to take from step "
                                  f"{from_step}")
        if src is None or not src.complete or src.sizes.get(from_name) != size or \
                (src.directory is None) != (r.directory is None):
            raise InvalidArgument(f"{job} step {step} rank {rank}: no replica of step {from_step} with a "
                                  f"{size}-byte {from_name} held here in the same place")
        if r.directory is None:
            data = src.files.get(from_name)
            if data is None:
                raise InvalidArgument(f"{job} step {from_step} rank {rank}: no longer held here")
            r.files[name] = data  # (the same bytes: neither is written to again)
        else:
            os.unlink(r.directory / name)
            os.link(src.directory / from_name, r.directory / name, follow_symlinks=False)
        r.linked.add(name)
        r.received += size
        r.touched = time.monotonic()

    def end(self, job: str, step: int, rank: int) -> None:
        r = self._parts.get((job, step, rank))
        if r is None:
            raise InvalidArgument(f"{job} step {step} rank {rank}: no replica begun")
        if r.received < sum(r.sizes.values()):
            raise InvalidArgument(f"{job} step {step} rank {rank}: ended with {r.received} of "
                                  f"{sum(r.sizes.values())} bytes")
        if r.directory is not None:
            (r.directory / MANIFEST_NAME).write_bytes(r.manifest)
        else:
            for name, size in r.sizes.items():
                r.files.setdefault(name, bytearray(size))  # (empty files get no piece)
        r.complete = True
        with self._lock:
            self._keep_newest(job)

    def load_disk(self) -> None:
        """Take up the replicas a previous run of this daemon ended on disk; drop the unfinished."""
        if self.directory is None or not self.directory.is_dir():
            return
        found = [*self.directory.glob("*/step-*/rank-*"), *self.directory.glob("*/*/step-*/rank-*")]
        for part in found:
            job = str(part.parent.parent.relative_to(self.directory))
            try:
                raw = (part / MANIFEST_NAME).read_bytes()
                m = parse(raw, str(part))
                sizes = {f["name"]: int(f["bytes"]) for f in m.files}
                if any((part / n).stat().st_size != size for n, size in sizes.items()):
                    raise ValueError("a file of another size")
            except (OSError, ValueError, AssertionError, SnapdError) as e:
                log.info("dropping the unfinished replica %s (%s)", part, e)
                shutil.rmtree(part, ignore_errors=True)
                continue
            p = m.part or {"rank": 0, "world_size": 1, "run": ""}  # (none: a single process's snapshot)
            r = Replica(job, m.step, p["rank"], p["world_size"], p["run"], "disk", raw, m.checksum or "",
                        sizes, directory=part, received=sum(sizes.values()), complete=True,
                        whole=m.part is None, taken=taken_of(m))
            self._parts[(job, r.step, r.rank)] = r
        for job in {k[0] for k in self._parts}:
            self._keep_newest(job)
        if self._parts:
            log.info("holding %d replica(s) kept on disk by an earlier run", len(self._parts))

    # -- serving --------------------------------------------------------------------------
    def get(self, job: str, step: int, rank: int) -> Replica | None:
        r = self._parts.get((job, step, rank))
        return r if r is not None and r.complete else None

    def read(self, r: Replica, name: str, offset: int, length: int) -> bytes | memoryview:
        """Bytes of a complete replica's file: of one in memory, a view of its own bytes (never
        written again: sent as they are, not copied)."""
        if name == MANIFEST_NAME:
            return r.manifest[offset:offset + length]
        if name not in r.sizes:
            raise InvalidArgument(f"{r.job} step {r.step} rank {r.rank}: no file {name}")
        if r.directory is None:
            data = r.files.get(name)
            if data is None:  # (dropped meanwhile: a newer step of its job is complete here)
                raise InvalidArgument(f"{r.job} step {r.step} rank {r.rank}: no longer held here")
            return memoryview(data)[offset:offset + length]
        fd = os.open(r.directory / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def held(self, job: str) -> list[Replica]:
        with self._lock:
            return [r for r in self._parts.values() if r.job == job and r.complete]

    def status(self) -> dict:
        with self._lock:
            parts = list(self._parts.values())
        jobs: dict[str, dict[str, list[int]]] = {}
        for r in parts:
            if r.complete:
                jobs.setdefault(r.job, {}).setdefault(str(r.step), []).append(r.rank)
        for steps in jobs.values():
            for ranks in steps.values():
                ranks.sort()
        return {"memory_bytes": sum(r.nbytes for r in parts if r.directory is None),
                "memory_budget_bytes": self.memory_bytes,
                "disk_bytes": sum(r.nbytes for r in parts if r.directory is not None),
                "parts": len(parts), "jobs": jobs}

    # -- keeping --------------------------------------------------------------------------
    def _make_room(self, r: Replica) -> None:
        """In memory if it fits (older steps of any job dropped first), else on disk, else NoRoom."""
        if r.nbytes <= self.memory_bytes:
            now = time.monotonic()
            for old in sorted(self._parts.values(), key=lambda o: (o.complete, o.step)):
                if self.memory_used() + r.nbytes <= self.memory_bytes:
                    break
                # (a copy its sender stopped sending, or one a newer committed step supersedes)
                stale = not old.complete and now - old.touched > STALE_S
                if old.directory is None and (stale or keeping.superseded(self._parts, old, self.committed)):
                    self._drop(self._parts.pop((old.job, old.step, old.rank)))
            if self.memory_used() + r.nbytes <= self.memory_bytes:
                return
        if self.directory is None:
            raise NoRoom(f"no room for {r.job} step {r.step} rank {r.rank} ({r.nbytes >> 20} MiB): "
                         f"{self.memory_used() >> 20} of {self.memory_bytes >> 20} MiB of replica memory "
                         "held, and no replica_dir")
        r.directory = self.directory / r.job / snapshot_name(r.step) / part_dir(r.rank)
        shutil.rmtree(r.directory, ignore_errors=True)
        r.directory.mkdir(parents=True, mode=0o700)
        for name, size in r.sizes.items():
            fd = os.open(r.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

    def prune(self, job: str) -> None:
        """A step of ``job`` was committed: what it supersedes goes (the peer server's thread)."""
        with self._lock:
            self._keep_newest(job)

    def _keep_newest(self, job: str) -> None:
        for key in keeping.superseded_keys(self._parts, job, self.committed):
            self._drop(self._parts.pop(key))

    def _drop(self, r: Replica | None) -> None:
        if r is None:
            return
        r.files = {}
        if r.directory is not None:
            shutil.rmtree(r.directory, ignore_errors=True)
        log.debug("dropped the replica of %s step %d rank %d", r.job, r.step, r.rank)

