"""Where a job's snapshots are: every step this node or a peer knows of a job, with the nodes that
hold each rank's part (on disk or as a replica, in memory or on disk) and how fast each source is;
and, with a remote tier, the bucket's newest global snapshot where no node holds a newer one whole.
``snapd.daemon.part_fetch`` picks the step to resume from and brings its parts from these sources.

Every peer is asked at once (``have``: snapd.peers.wire.ask_all), with sockets made for the survey
and closed after, and waited for until the answers settle it (snapd.daemon.survey_steps.settled);
a survey is kept ``SURVEY_FRESH_S`` for each local rank's fetches that follow. Peers name the global
manifests they hold (``brief``); the one a restore commits here is brought once (``global_raw``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path

import zmq

from snapd.daemon.bucket_parts import REMOTE, BucketParts
from snapd.daemon.part_download import HELD_HERE
from snapd.daemon.survey_steps import SPEED, Step, fold, forget_removed, settled
from snapd.daemon.whole_snapshots import HERE, Copy
from snapd.errors import FormatError, RemoteError, SnapdError, SnapshotNotFound
from snapd.format.global_manifest import GlobalManifest, global_id, parse_any, part_dir
from snapd.format.index import removed_of
from snapd.format.jobdir import read_regular
from snapd.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, taken_of
from snapd.peers import wire
from snapd.peers.directory import PeerDirectory
from snapd.peers.keys import PeerKeys
from snapd.peers.replicas import ReplicaStore
from snapd.remote.store import answered_within

log = logging.getLogger(__name__)

SURVEY_FRESH_S = 10.0
# how long a survey waits for the bucket where the nodes hold a step whole: a listing of ~100k
# objects fits (the bucket may hold a newer step: leaving it out would resume from an older one)
BUCKET_SURVEY_S = 20.0
BUCKET_ASKING = 2  # the bucket's surveys waiting at once; beyond, it is left out (it hangs)


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
        removed = removed_of(self.root / job)  # (a user's removals here: their copies stay gone)
        for r in self.store.held(job):
            speed = SPEED["memory"] if r.where == "memory" else SPEED["disk"]
            s = steps.setdefault(r.step, Step(r.step))
            if r.whole:
                s.whole.append(Copy(speed, HELD_HERE, r.checksum, r.taken))
            else:
                s.sources.setdefault(r.rank, []).append((speed, HELD_HERE))
        forget_removed(steps, removed)
        # (a daemon just started: its first read of the directory)
        peers = self.directory.all(wait_s=min(5.0, self.timeout_s), job=job)

        def on_reply(ep: str, reply: dict | SnapdError) -> None:
            fold(steps, ep, job, reply)
            forget_removed(steps, removed)
        replies = wire.ask_all(self.ctx, self.keys, [p.endpoint for p in peers],
                               {"t": "have", "job": job, "brief": True},
                               min(5.0, self.timeout_s), on_reply=on_reply,
                               settled=lambda: settled(steps, want))
        for ep, reply in replies.items():  # (each answer is in ``steps`` already)
            if isinstance(reply, SnapdError):
                log.warning("peer %s: cannot ask what it holds of %s: %s", ep, job, reply)
        if self.bucket is not None and not any(s.whole for s in steps.values()):
            self._add_bucket(job, steps, want)  # (a single process's snapshots: its client asks the bucket)
            forget_removed(steps, removed)
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
                 if s.world_size and all(s.sources.get(r) for r in range(s.world_size))]
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
            above = max(((steps[s].taken, s) for s in whole), default=None)  # (taken last)
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
        if not s.world_size:
            s.name(m, raw, REMOTE)
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
                s = steps.setdefault(m.step, Step(m.step))
                if not s.world_size:
                    s.name(m, raw, "this node")
                for r in range(m.world_size):
                    if (local / name / part_dir(r) / MANIFEST_NAME).exists():
                        s.sources.setdefault(r, []).append((SPEED["local"], ""))
            elif m.part is None:  # a single process's snapshot
                steps.setdefault(m.step, Step(m.step)).whole.append(
                    Copy(SPEED["local"], HERE, m.checksum or "", taken_of(m)))
        return steps

    def global_raw(self, job: str, s: Step) -> bytes:
        """Step ``s``'s global manifest, as the peers that named it briefly have it: brought from the
        first of them that gives it (a daemon before the ``global`` request: its full ``have``), and
        checked to be the making they named."""
        if s.raw is not None:
            return s.raw
        errors = []
        for endpoint in s.named_by:
            link = wire.Link(self.ctx, self.keys, endpoint, self.timeout_s)
            try:
                try:
                    raw = _pieces(link, {"t": "global", "job": job, "step": s.step})
                except wire.PeerRefused:
                    header, _ = link.request({"t": "have", "job": job})
                    raw = next((e["global"].encode() for e in header.get("steps") or [] if isinstance(e, dict)
                                and e.get("step") == s.step and isinstance(e.get("global"), str)), b"")
                if global_id(raw) == s.id:
                    s.raw = raw
                    return raw
                errors.append(f"{endpoint}: not the making of step {s.step} it named")
            except (SnapdError, zmq.ZMQError) as e:
                errors.append(f"{endpoint}: {e}")
            finally:
                link.close()
        raise SnapshotNotFound(f"{job} step {s.step}: its global manifest from no peer that named it "
                               f"({'; '.join(errors)})")

    def recent(self, job: str) -> dict[int, Step]:
        """A survey of the last few seconds (each local rank's fetches need not ask every peer)."""
        with self._lock:
            at, steps = self._surveyed.get(job, (0.0, {}))
        if time.monotonic() - at > SURVEY_FRESH_S:
            steps = self.survey(job)
        return steps


def _pieces(link: wire.Link, ask: dict) -> bytes:
    """A file a peer gives in pieces (``offset``, ``length``; each reply says its ``size``), whole."""
    out = bytearray()
    while True:
        header, data = link.request({**ask, "offset": len(out), "length": wire.PIECE_BYTES})
        size = header.get("size")
        if type(size) is not int or not 0 <= size <= MAX_MANIFEST_BYTES:
            raise FormatError(f"{link.endpoint}: a global manifest of {size!r} bytes")
        out += data if data is not None else b""
        if len(out) >= size or not data:
            return bytes(out[:size])
