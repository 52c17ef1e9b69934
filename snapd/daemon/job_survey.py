"""Where a job's snapshots are: every step this node or a peer knows of a job, with the nodes that
hold each rank's part (on disk or as a replica, in memory or on disk) and how fast each source is;
and, with a remote tier, the bucket's newest global snapshot where no node holds a newer one whole.
``snapd.daemon.part_fetch`` picks the step to resume from and brings its parts from these sources.

Every peer is asked at once (``have``: snapd.peers.wire.ask_all), with sockets made for the survey
and closed after; a survey is kept ``SURVEY_FRESH_S`` for each local rank's fetches that follow.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from snapd.daemon.bucket_parts import REMOTE, BucketParts
from snapd.daemon.part_download import HELD_HERE
from snapd.daemon.whole_snapshots import HERE, Copy
from snapd.errors import FormatError, RemoteError, SnapdError
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.jobdir import read_regular
from snapd.format.manifest import MANIFEST_NAME, taken_of
from snapd.peers import wire
from snapd.peers.directory import PeerDirectory
from snapd.peers.keys import PeerKeys
from snapd.peers.replicas import ReplicaStore
from snapd.remote.store import answered_within

log = logging.getLogger(__name__)

SPEED = {"local": 0, "memory": 1, "disk": 2, "remote": 4}  # the order sources are tried in
SURVEY_FRESH_S = 10.0
# how long a survey waits for the bucket where the nodes hold a step whole: a listing of ~100k
# objects fits (the bucket may hold a newer step: leaving it out would resume from an older one)
BUCKET_SURVEY_S = 20.0
BUCKET_ASKING = 2  # the bucket's surveys waiting at once; beyond, it is left out (it hangs)


def _speed(where: object) -> int:
    """Where a peer says it holds a part (``disk``, ``memory``), as a place in the order of sources."""
    return SPEED.get(where, 3) if isinstance(where, str) else 3


def _taken(v: object) -> float:
    """A peer's ``taken`` time of a snapshot, or 0 (oldest) where it is not a finite number."""
    try:
        t = float(v) if type(v) in (int, float) else 0.0  # type: ignore[arg-type]
    except OverflowError:
        return 0.0
    return t if math.isfinite(t) else 0.0


def missing(steps: dict[int, Step], want: int | None) -> str:
    """Why no step can be restored, for the client's error: the newest steps known and the ranks
    whose parts no node that answered holds (a lost node's part never replicated, say)."""
    known = sorted((s for s in steps.values() if s.manifest is not None and want in (None, s.step)),
                   key=lambda s: taken_of(s.manifest), reverse=True)[:3]
    if not known:
        return f"no node that answered knows step {want} of the job" if want is not None else \
            "no node that answered holds a committed step of the job"
    lines = []
    for s in known:
        assert s.manifest is not None
        lost = [r for r in range(s.manifest.world_size) if not s.sources.get(r)]
        lines.append(f"step {s.step}: rank(s) {lost}'s part(s) on no node that answered")
    return "; ".join(lines)


@dataclass
class Step:
    step: int
    manifest: GlobalManifest | None = None
    raw: bytes | None = None
    where: str = ""  # the node whose manifest it is
    sources: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # rank -> [(speed, endpoint)]
    whole: list[Copy] = field(default_factory=list)  # a single process's snapshot of this step


class Survey:
    def __init__(self, keys: PeerKeys, directory: PeerDirectory, root: Path, store: ReplicaStore,
                 timeout_s: float, ctx: zmq.Context, bucket: BucketParts | None = None) -> None:
        self.keys, self.directory, self.root, self.store = keys, directory, root, store
        self.timeout_s, self.ctx, self.bucket = timeout_s, ctx, bucket
        self._lock = threading.Lock()
        self._surveyed: dict[str, tuple[float, dict[int, Step]]] = {}  # job -> (when, survey)
        self._bucket_asking = 0  # surveys of the bucket not answered yet

    def survey(self, job: str, want: int | None = None) -> dict[int, Step]:
        """Every step of ``job`` this node or a peer knows, with each part's sources; and the
        bucket's newest global snapshot (or step ``want``) where no node holds a newer one whole."""
        steps = self.here(job)
        for r in self.store.held(job):
            speed = SPEED["memory"] if r.where == "memory" else SPEED["disk"]
            s = steps.setdefault(r.step, Step(r.step))
            if r.whole:
                s.whole.append(Copy(speed, HELD_HERE, r.checksum, r.taken))
            else:
                s.sources.setdefault(r.rank, []).append((speed, HELD_HERE))
        # (a daemon just started: its first read of the directory)
        peers = self.directory.all(wait_s=min(5.0, self.timeout_s), job=job)
        replies = wire.ask_all(self.ctx, self.keys, [p.endpoint for p in peers], {"t": "have", "job": job},
                               min(5.0, self.timeout_s),
                               on_reply=lambda ep, reply: self._fold(steps, ep, job, reply),
                               settled=lambda: settled(steps, want))
        for ep, reply in replies.items():  # (each answer is in ``steps`` already)
            if isinstance(reply, SnapdError):
                log.warning("peer %s: cannot ask what it holds of %s: %s", ep, job, reply)
        if self.bucket is not None and not any(s.whole for s in steps.values()):
            self._add_bucket(job, steps, want)  # (a single process's snapshots: its client asks the bucket)
        for s in steps.values():
            s.whole.sort()
            for srcs in s.sources.values():
                srcs.sort()
        with self._lock:
            self._surveyed[job] = (time.monotonic(), steps)
        return steps

    def _add_bucket(self, job: str, steps: dict[int, Step], want: int | None) -> None:
        """The bucket's newest global snapshot, if newer than what the nodes hold whole; asked on a
        thread of its own, and waited for ``BUCKET_SURVEY_S`` at most where the nodes hold a step
        whole (a bucket that hangs must not hold up a restore the nodes can serve)."""
        whole = [s.step for s in steps.values()
                 if s.manifest is not None and all(s.sources.get(r) for r in range(s.manifest.world_size))]
        if want in whole:
            return
        assert self.bucket is not None
        with self._lock:
            if self._bucket_asking >= BUCKET_ASKING:
                log.warning("the remote tier has not answered %d surveys of this node yet: restoring %s "
                            "from the nodes only", self._bucket_asking, job)
                return
            self._bucket_asking += 1
        wait = BUCKET_SURVEY_S if whole else max(BUCKET_SURVEY_S, 4 * self.timeout_s)  # (none: the only hope)
        try:
            above = max(((taken_of(steps[s].manifest), s) for s in whole), default=None)  # (taken last)
            found = answered_within(functools.partial(self._ask_bucket, job, above, want),
                                    wait, "the remote tier")
        except RemoteError:
            log.warning("the remote tier does not answer for %s within %.0f s: restoring from the nodes only",
                        job, wait)
            return
        if found is None:
            return
        m, raw = found
        s = steps.setdefault(m.step, Step(m.step))
        if s.manifest is None:
            s.manifest, s.raw, s.where = m, raw, REMOTE
        for r in range(m.world_size):
            s.sources.setdefault(r, []).append((SPEED["remote"], REMOTE))

    def _ask_bucket(self, job: str, above: tuple[float, int] | None,
                    want: int | None) -> tuple[GlobalManifest, bytes] | None:
        try:
            assert self.bucket is not None
            return self.bucket.newest(job, above, want)
        finally:
            with self._lock:
                self._bucket_asking -= 1

    def here(self, job: str) -> dict[int, Step]:
        """The steps of ``job`` committed on this node's disk, with the parts there."""
        steps: dict[int, Step] = {}
        local = self.root / job
        for name in (os.listdir(local) if local.is_dir() else []):
            if not name.startswith("step-"):
                continue
            try:
                raw = read_regular(local / name / MANIFEST_NAME)
                m = parse_any(raw, str(local / name))
            except (OSError, FormatError):
                continue
            if isinstance(m, GlobalManifest):
                s = steps.setdefault(m.step, Step(m.step, m, raw, "this node"))
                for r in range(m.world_size):
                    if (local / name / part_dir(r) / MANIFEST_NAME).exists():
                        s.sources.setdefault(r, []).append((SPEED["local"], ""))
            elif m.part is None:  # a single process's snapshot
                steps.setdefault(m.step, Step(m.step)).whole.append(
                    Copy(SPEED["local"], HERE, m.checksum or "", taken_of(m)))
        return steps

    def recent(self, job: str) -> dict[int, Step]:
        """A survey of the last few seconds (each local rank's fetches need not ask every peer)."""
        with self._lock:
            at, steps = self._surveyed.get(job, (0.0, {}))
        if time.monotonic() - at > SURVEY_FRESH_S:
            steps = self.survey(job)
        return steps

    @staticmethod
    def _fold(steps: dict[int, Step], endpoint: str, job: str, reply: dict | SnapdError) -> None:
        """A peer's answer to ``have``: the steps it holds (their global manifests, its rank parts
        or a single process's copies), added to ``steps``."""
        if isinstance(reply, SnapdError):
            return
        have = reply.get("steps")
        for entry in have if isinstance(have, list) else []:
            if not (isinstance(entry, dict) and type(entry.get("step")) is int):
                continue
            s = steps.setdefault(entry["step"], Step(entry["step"]))
            if isinstance(entry.get("whole"), str) and isinstance(entry.get("parts"), dict):
                s.whole.append(Copy(_speed(entry["parts"].get("0")), endpoint, entry["whole"],
                                    _taken(entry.get("taken"))))
                continue
            if s.manifest is None and entry.get("global"):
                try:
                    m = parse_any(entry["global"].encode(), f"{endpoint}: {job} step {s.step}")
                except FormatError as e:
                    log.warning("%s", e)
                    continue
                if isinstance(m, GlobalManifest) and m.step == s.step:
                    s.manifest, s.raw, s.where = m, entry["global"].encode(), endpoint
            for r, where in entry.get("parts", {}).items():
                if isinstance(r, str) and r.isdigit():
                    s.sources.setdefault(int(r), []).append((_speed(where), endpoint))


def settled(steps: dict[int, Step], want: int | None) -> bool:
    """Whether what is known of ``steps`` settles what a restore takes, the peers yet to answer
    aside: step ``want`` with each of its parts somewhere; or, for the newest, that the newest
    committed step anyone named (taken last) has every part somewhere. Until then, a peer not
    heard from may hold the part that completes a newer step, and is waited for (a restore must not
    take an older step for want of it). A step only its parts are known of (its global manifest
    nowhere yet) is not one a restore can take, and does not count."""
    def whole(s: Step) -> bool:
        return bool(s.whole) or s.manifest is not None and all(
            s.sources.get(r) for r in range(s.manifest.world_size))

    def taken(s: Step) -> tuple[float, int]:  # (as part_fetch.locate and newest_first order them)
        return (taken_of(s.manifest) if s.manifest is not None else max(c.taken for c in s.whole), s.step)

    if want is not None:
        return want in steps and whole(steps[want])
    named = [s for s in steps.values() if s.manifest is not None or s.whole]
    return bool(named) and whole(max(named, key=taken))

