"""The remote tier as one more source of a job's parts, for a restore on nodes that share no
filesystem (snapd.daemon.part_fetch): the bucket's newest global snapshot of the job counts as
holding every rank's part, behind the nodes' disks and replicas (it is the slowest source, tried
last), so a step the bucket has that no set of nodes still holds whole is resumed from, and a part
no node answers for is brought from the bucket.

The part is read with ranged GETs, ``STREAMS`` at once, into the files ``part_fetch`` then checks
chunk by chunk against the manifest the global snapshot names, as for a copy from a peer.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from snapd.errors import FormatError, SnapdError
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.manifest import MANIFEST_NAME
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store

log = logging.getLogger(__name__)

REMOTE = "the remote tier"  # a part's source, beside peers' endpoints
PIECE = 16 << 20  # one ranged GET
STREAMS = 8


class BucketParts:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(STREAMS, thread_name_prefix="snapd-bucket-part")
        self._names: dict[tuple[str, int], str] = {}  # (job, step) -> the snapshot's name there

    def newest(self, job: str, above: int, want: int | None) -> tuple[GlobalManifest, bytes] | None:
        """The bucket's newest global snapshot of ``job`` newer than step ``above`` (or step
        ``want``, whatever the others hold), with its manifest's bytes; None if there is none or the
        bucket does not answer (logged: the disks and peers still serve)."""
        rjob = RemoteJob(self.store, job)
        try:
            steps = rjob.steps()
            for step in sorted(steps, reverse=True):
                if want is not None and step != want or want is None and step <= above:
                    continue
                raw = rjob.manifest_bytes(steps[step])
                if raw is None:  # (removed by retention meanwhile)
                    continue
                try:
                    m = parse_any(raw, rjob.where(f"{steps[step]}/{MANIFEST_NAME}"))
                except FormatError as e:
                    log.warning("%s", e)
                    continue
                if isinstance(m, GlobalManifest) and m.step == step:
                    self._names[(job, step)] = steps[step]
                    return m, raw
                if want is None:  # (one process's snapshot: no parts to offer)
                    return None
        except SnapdError as e:
            log.warning("the remote tier does not answer for %s (%s): restoring from the nodes only", job, e)
        return None

    def _key(self, job: str, step: int, rank: int, name: str) -> str:
        snapshot = self._names.get((job, step))
        if snapshot is None:
            raise FormatError(f"step {step} of {job} was not found in the bucket")
        return RemoteJob(self.store, job).key(snapshot, part_dir(rank), name)

    def manifest(self, job: str, step: int, rank: int) -> bytes:
        raw = self.store.get(self._key(job, step, rank, MANIFEST_NAME))
        if raw is None:
            raise FormatError(f"rank {rank}'s part of step {step} is not in the bucket")
        return raw

    def fill(self, fd: int, job: str, step: int, rank: int, name: str, size: int) -> None:
        """Object ``name`` of the part into the file ``fd`` (``size`` bytes), pieces in parallel."""
        key = self._key(job, step, rank, name)

        def piece(off: int) -> None:
            n = min(PIECE, size - off)
            buf = bytearray(n)
            got = self.store.get_range_into(key, off, memoryview(buf))
            if got != n:
                raise FormatError(f"{name}: got {got} of {n} bytes at {off}")
            os.pwrite(fd, buf, off)

        for f in [self._pool.submit(piece, off) for off in range(0, size, PIECE)]:
            f.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
