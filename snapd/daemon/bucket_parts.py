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
from snapd.format.manifest import MANIFEST_NAME, taken_of
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

    def newest(self, job: str, above: tuple[float, int] | None,
               want: int | None) -> tuple[GlobalManifest, bytes] | None:
        """The bucket's newest global snapshot of ``job`` (taken last, as the index orders latest: a
        run that went back to an earlier step takes lower steps later), if it was taken after
        ``above`` (the (time, step) of what the nodes hold whole), or its step ``want``, whatever
        the others hold; with its manifest's bytes. None if there is none or the bucket does not
        answer (logged: the disks and peers still serve)."""
        rjob = RemoteJob(self.store, job)
        try:
            steps = rjob.steps()
            if want is not None:
                steps = {s: n for s, n in steps.items() if s == want}
            with ThreadPoolExecutor(min(STREAMS, max(1, len(steps)))) as pool:  # (each step's manifest)
                raws = list(pool.map(rjob.manifest_bytes, steps.values()))
            found = []
            for (step, name), raw in zip(steps.items(), raws):
                if raw is None:  # (removed by retention meanwhile)
                    continue
                try:
                    m = parse_any(raw, rjob.where(f"{name}/{MANIFEST_NAME}"))
                except FormatError as e:
                    log.warning("%s", e)
                    continue
                if isinstance(m, GlobalManifest) and m.step == step:  # (one process's snapshots: no parts)
                    found.append(((taken_of(m), step), name, m, raw))
            if not found:
                return None
            order, name, m, raw = max(found, key=lambda f: f[0])
            if want is None and above is not None and order <= above:
                return None
            self._names[(job, order[1])] = name
            return m, raw
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
