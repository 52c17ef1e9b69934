"""One part's bytes brought from one source into a temporary directory of its job, checked.

A source is a peer (its disk or its replica store: several links pull ranges of a file at once),
this daemon's own replica store, or the remote tier (ranged GETs: snapd.daemon.bucket_parts). The
manifest comes first and must be the one the caller expects (its checksum, from the global
snapshot or from the survey); then each data file is written at its offsets and every chunk is
checked against the manifest's checksum (snapd.daemon.part_files). Nothing here is renamed into
place: the caller does that (a rank's part into its step, a single process's snapshot as a
commit), and removes the directory when it fails.

A single process's snapshot (``whole``) is rank 0 of 1 whose files lie in its step's directory
itself; peers are asked for it as such.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from snapd.daemon.bucket_parts import REMOTE, BucketParts
from snapd.daemon.part_files import FileCheck, whole_manifest
from snapd.errors import ChecksumError, FormatError, SnapshotNotFound
from snapd.format.jobdir import JobDir
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse
from snapd.peers import wire
from snapd.peers.keys import PeerKeys
from snapd.peers.replicas import ReplicaStore

log = logging.getLogger(__name__)

HELD_HERE = "held here"  # a source: this daemon's own replica store


class Download:
    def __init__(self, keys: PeerKeys, store: ReplicaStore, timeout_s: float,
                 bucket: BucketParts | None = None) -> None:
        self.keys, self.store, self.timeout_s, self.bucket = keys, store, timeout_s, bucket
        self.ctx = wire.context(wire.STREAMS)  # (a survey asks every peer at once)
        self._streams = ThreadPoolExecutor(wire.STREAMS, thread_name_prefix="snapd-pull")  # (each its links)
        self._local = threading.local()  # each thread its own links
        self.damaged = 0  # copies whose bytes failed their checksums

    def link(self, endpoint: str) -> wire.Link:
        links = self._local.__dict__.setdefault("links", {})
        if endpoint not in links:
            links[endpoint] = wire.Link(self.ctx, self.keys, endpoint, self.timeout_s)
        return links[endpoint]

    def into_tmp(self, job_dir: JobDir, job: str, step: int, rank: int, endpoint: str, want: str,
                 whole: bool = False) -> tuple[Path, Manifest, int]:
        """Bring the part from ``endpoint`` into a new temporary directory of ``job_dir``, its
        manifest's checksum ``want``: the directory, the manifest and the data bytes brought."""
        if endpoint == REMOTE:
            assert self.bucket is not None and not whole
            bucket = self.bucket

            def fill(fd: int, name: str, size: int, check: FileCheck) -> None:
                bucket.fill(fd, job, step, rank, name, size)  # (in any order: checked at finish)
            raw = bucket.manifest(job, step, rank)
        elif endpoint == HELD_HERE:
            replica = self.store.get(job, step, rank)
            if replica is None or replica.whole != whole:
                raise SnapshotNotFound("this node's replica is gone")
            read = functools.partial(self.store.read, replica)

            def fill(fd: int, name: str, size: int, check: FileCheck) -> None:
                check.expect([(0, size)] if size else [])
                for off in range(0, size, wire.PIECE_BYTES):
                    check.put(fd, read(name, off, min(wire.PIECE_BYTES, size - off)), off)
        else:  # a peer
            base = {"t": "get", "job": job, "step": step, "rank": rank, **({"whole": True} if whole else {})}
            read = functools.partial(self._get, self.link(endpoint), base)

            def fill(fd: int, name: str, size: int, check: FileCheck) -> None:
                ranges = check.expect(wire.split(size, check.cuts))
                wire.fetch(lambda: self.link(endpoint), self._streams, {**base, "file": name}, ranges,
                           lambda data, off: check.put(fd, data, off))
        if endpoint != REMOTE:
            raw = whole_manifest(read)
        m = parse(raw, f"{endpoint}: {job} step {step} rank {rank}")
        if m.checksum != want:
            raise FormatError(f"its manifest is not the one the {'survey' if whole else 'global snapshot'} "
                              f"names ({m.checksum} != {want})")
        if m.step != step or whole != (m.part is None):
            raise FormatError(f"its manifest is of step {m.step}, part {m.part}")
        tmp = job_dir.new_tmp_dir(step)
        try:
            (tmp / MANIFEST_NAME).write_bytes(raw)
            total = 0
            for f in m.files:
                fd = os.open(tmp / f["name"], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                try:
                    check = FileCheck(m, f["name"])
                    fill(fd, f["name"], int(f["bytes"]), check)
                    if os.fstat(fd).st_size != int(f["bytes"]):
                        raise FormatError(f"{f['name']}: got {os.fstat(fd).st_size} of {f['bytes']} bytes")
                    check.finish(fd)
                except ChecksumError:
                    self.damaged += 1
                    raise
                finally:
                    os.close(fd)
                total += int(f["bytes"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, m, total

    @staticmethod
    def _get(link: wire.Link, base: dict, name: str, offset: int, length: int) -> bytes:
        _, data = link.request({**base, "file": name, "offset": offset, "length": length})
        return bytes(data or b"")

    def close(self) -> None:
        self._streams.shutdown(wait=False, cancel_futures=True)
