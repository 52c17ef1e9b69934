"""Restore from wherever the parts are: where a job's newest complete step is, and its parts
brought to this node's disk when a reader needs them (client.restore on nodes that share no
filesystem, or on a replacement node whose disk is empty).

``locate`` finds, from a survey of what every node holds (snapd.daemon.job_survey), the newest
step whose global manifest some node has and whose every part is on some node: on its disk, or as
a replica in memory or on disk; or that the remote tier holds whole, if it is newer (its parts are
then brought from the bucket unless a node has them: snapd.daemon.bucket_parts). If this node has
not committed that step, its global manifest is adopted (snapd.format.spread_commit). ``fetch``
brings one part: from the fastest source first (a replica in memory, then a disk, the bucket
last), into a temporary directory, each chunk checked against the manifest's checksum (as its
bytes come: snapd.daemon.part_files) and the manifest against the one the global snapshot names;
a damaged copy is dropped with a log line and the next source is tried. Only a checked part is
renamed into place. A single process's snapshot (rank 0 of 1, replicated whole once committed on
its node) is found the same way; ``locate`` brings the newest one whole and commits it here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from snapd.daemon.bucket_parts import BucketParts
from snapd.daemon.job_survey import Survey
from snapd.daemon.survey_steps import missing
from snapd.daemon.part_download import Download
from snapd.daemon.whole_snapshots import Copy, bring, newest_first
from snapd.errors import FormatError, SnapdError, SnapshotNotFound
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.jobdir import JobDir, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.retention import Retention
from snapd.format.spread_commit import adopt
from snapd.peers.directory import PeerDirectory
from snapd.peers.keys import PeerKeys
from snapd.peers.replicas import ReplicaStore

log = logging.getLogger(__name__)


class PartFetch:
    def __init__(self, keys: PeerKeys, directory: PeerDirectory, root: Path, store: ReplicaStore,
                 timeout_s: float, bucket: BucketParts | None = None) -> None:
        self.keys, self.directory, self.root, self.store = keys, directory, root, store
        self.bucket = bucket
        self.timeout_s = timeout_s
        self.download = Download(keys, store, timeout_s, bucket)
        self.ctx = self.download.ctx
        self._inflight: dict[tuple[str, int, int], threading.Event] = {}
        self._lock = threading.Lock()
        self.fetched_bytes = 0
        self.surveys = Survey(keys, directory, root, store, timeout_s, self.ctx, bucket)

    @property
    def damaged(self) -> int:
        return self.download.damaged

    def locate(self, job_dir: JobDir, job: str, step: int | None, retention: Retention) -> dict[str, Any]:
        """The newest step of the job (or ``step``) whose parts are all somewhere, committed here
        (adopted if need be); ``{"step": None}`` when there is none."""
        steps = self.surveys.survey(job, step)
        if not any(s.world_size for s in steps.values()):  # a single process's job (whole_snapshots)
            return self._whole(job_dir, job, newest_first({n: s.whole for n, s in steps.items()}, step), step,
                               retention)
        # the newest first: taken last (a run resumed from an earlier step takes lower steps later)
        for s in sorted(steps.values(), key=lambda s: (s.taken if s.world_size else 0.0, s.step),
                        reverse=True):
            if step is not None and s.step != step:
                continue
            if s.whole and not s.world_size:  # (a job that ran on one process, then on several)
                return self._whole(job_dir, job, newest_first({s.step: s.whole}), step, retention)
            if not s.world_size or any(not s.sources.get(r) for r in range(s.world_size)):
                continue
            if not (job_dir.path / snapshot_name(s.step) / MANIFEST_NAME).exists():
                try:
                    adopt(job_dir, self.surveys.global_raw(job, s), retention, s.named_by[0])
                except (SnapshotNotFound, FormatError) as e:
                    if step is not None:
                        raise
                    log.warning("%s: %s; looking for an older step", job_dir.path, e)
                    continue
            where = {r: [e or "this node" for _, e in s.sources[r]] for r in range(s.world_size)}
            log.info("%s: resuming from step %d (parts: %s)", job_dir.path, s.step, where)
            return {"step": s.step, "parts": {str(r): w for r, w in where.items()}}
        return {"step": None, "missing": missing(steps, step)}

    # -- bring a part here ------------------------------------------------------------------
    @contextlib.contextmanager
    def _alone(self, key: tuple[str, int, int]) -> Iterator[None]:
        """Bring one thing at a time: another thread bringing ``key`` is waited for (the caller
        then finds it here)."""
        while True:
            with self._lock:
                busy = self._inflight.get(key)
                if busy is None:
                    self._inflight[key] = threading.Event()
                    break
            busy.wait()
        try:
            yield
        finally:
            with self._lock:
                self._inflight.pop(key).set()

    def _whole(self, job_dir: JobDir, job: str, found: list[tuple[int, list[Copy]]], want: int | None,
               retention: Retention) -> dict[str, Any]:
        """The first of ``found`` (newest first) that can be brought here whole; for the newest
        step (``want`` None), an older one when none of a newer one's copies is usable."""
        for n, copies in found:
            try:
                where, nbytes = bring(self.download, self._alone, job_dir, job, n, copies, retention)
            except SnapshotNotFound as e:
                if want is not None:
                    raise
                log.warning("%s: %s; looking for an older step", job_dir.path, e)
                continue
            self.fetched_bytes += nbytes
            return {"step": n, "parts": {"0": [where]}}
        why = (f"no usable copy of step(s) {[n for n, _ in found]} (the daemon's log says why)" if found else
               "no node that answered holds a snapshot of the job")
        return {"step": None, "missing": why}

    def fetch(self, job_dir: JobDir, job: str, step: int, rank: int) -> dict[str, Any]:
        """Make rank ``rank``'s part of committed step ``step`` present on this node."""
        final = job_dir.path / snapshot_name(step)
        with self._alone((job, step, rank)):
            if (final / part_dir(rank) / MANIFEST_NAME).exists():
                return {"from": "this node"}
            try:
                g = parse_any(read_regular(final / MANIFEST_NAME), str(final))
            except FileNotFoundError:
                raise SnapshotNotFound(f"{final}: no such committed snapshot on this node") from None
            if not isinstance(g, GlobalManifest) or rank >= g.world_size:
                raise SnapshotNotFound(f"{final}: no rank {rank} in this snapshot")
            want = g.parts[rank]["checksum"]
            s = self.surveys.recent(job).get(step)
            errors = []
            for _, endpoint in (s.sources.get(rank, []) if s else []):
                if not endpoint:
                    continue
                try:
                    t0 = time.monotonic()
                    n = self._bring(job_dir, job, step, rank, endpoint, want, final)
                    log.info("%s step %d: rank %d's part (%d MiB) came from %s in %.2f s", job, step, rank,
                             n >> 20, endpoint, time.monotonic() - t0)
                    return {"from": endpoint, "bytes": n}
                except (SnapdError, OSError, zmq.ZMQError) as e:
                    errors.append(f"{endpoint}: {e}")
                    log.warning("%s step %d: rank %d's part from %s unusable (%s); trying the next source",
                                job, step, rank, endpoint, e)
            raise SnapshotNotFound(f"{job} step {step}: rank {rank}'s part is on no node that answers"
                                   + (f" ({'; '.join(errors)})" if errors else ""))

    def _bring(self, job_dir: JobDir, job: str, step: int, rank: int, endpoint: str, want: str,
               final: Path) -> int:
        tmp, _, total = self.download.into_tmp(job_dir, job, step, rank, endpoint, want)
        try:
            try:
                os.rename(tmp, final / part_dir(rank))
            except OSError:  # (there already: another process brought it)
                if not (final / part_dir(rank) / MANIFEST_NAME).exists():
                    raise
            self.fetched_bytes += total
            return total
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
