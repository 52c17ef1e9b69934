"""Who a daemon's peers are: the ``peers`` list of its config, and the daemons that wrote their
endpoint where every node can read it: ``peer_directory`` (any directory every node mounts: the
job's shared root, a home directory) and the remote tier's bucket (``.snapd-peers/`` under its
prefix), whichever the daemon has. Each daemon writes its entry at start and again every
``REPUBLISH_S``; an entry not rewritten for ``STALE_S`` is a daemon gone. A job's own daemons are
also learned from its ranks (``learn``: each rank's client finds the others' through the job's
``torch.distributed`` group, client/group_peers.py): those are peers of that job only, so a user
can point only their own job's announcements and replicas elsewhere. Replicas go round a ring: the
daemons sorted by endpoint, each sending to the next ``replicas`` of them on another node.

Both are read, and the entry written, on a thread of their own (``start``): a bucket or a shared
filesystem that hangs must not hold up whoever asks who the peers are (a snapshot's seal stage,
``snapd status`` on the server thread, a restore). Each pass lists the entries and reads only those
rewritten since the last (an object's ETag, a file's mtime and size), ``READERS`` at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapd.errors import FormatError, InvalidArgument, LimitExceeded, SnapdError
from snapd.format.jobdir import read_regular
from snapd.peers.wire import check_endpoint

log = logging.getLogger(__name__)

RELOAD_S = 5.0  # how often the directory is read again
REPUBLISH_S = 60.0
STALE_S = 600.0
BUCKET_DIR = ".snapd-peers"
READERS = 8  # entries read at once in a pass
MAX_ENTRY_BYTES = 4096  # an entry is about 100 bytes: a bigger one is not read
# learned from jobs' groups, per user: the endpoints of their jobs together (each may get a
# replication thread of its own) and the jobs remembered (the one told longest ago forgotten first)
MAX_USER_PEERS = 1024
MAX_USER_JOBS = 64
# distinct endpoints all users' jobs may tell at once: each is a replication thread and a socket
# (snapd.peers.wire.MAX_SOCKETS a context); past it a telling is refused, never another's forgotten
MAX_LEARNED_PEERS = 4096


@dataclass(frozen=True, order=True)
class PeerInfo:
    endpoint: str
    node: str


class PeerDirectory:
    def __init__(self, own: str, node: str, peers: tuple[str, ...] = (),
                 directory: Path | None = None, store: Any = None) -> None:
        self.own, self.node, self.directory = own, node, directory
        self.store = store  # (snapd.remote.store.Store: the remote tier's bucket)
        self._listed = [PeerInfo(check_endpoint(e), e) for e in peers]
        self._found: list[PeerInfo] = []
        self._learned: OrderedDict[tuple[int, str], dict[str, PeerInfo]] = OrderedDict()  # (uid, job) ->
        self._learned_lock = threading.Lock()
        self._read: dict[str, tuple[Any, PeerInfo | None, float]] = {}  # entry -> (its tag, its peer, at)
        self._ready = threading.Event()  # the first pass is over
        self._stop = threading.Event()
        if directory is None and store is None:
            self._ready.set()

    def start(self) -> None:
        """Write this daemon's entry in the directory (a failure there is the config's: raised),
        then keep it written and the others' read on the ``snapd-peer-directory`` thread."""
        if self.directory is None and self.store is None:
            return
        self._write_file(self._entry())
        threading.Thread(target=self._loop, name="snapd-peer-directory", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def all(self, wait_s: float = 0.0, job: str | None = None) -> list[PeerInfo]:
        """Every other daemon, sorted by endpoint, as the last pass found them (``wait_s``: at
        most that long for the first pass of a daemon just started), and ``job``'s own."""
        if wait_s > 0:
            self._ready.wait(wait_s)
        seen = {p.endpoint: p for p in self._listed}
        seen.update({p.endpoint: p for p in self._found})
        if job is not None:
            with self._learned_lock:
                for (_, j), peers in self._learned.items():
                    if j == job:
                        seen.update(peers)
        seen.pop(self.own, None)
        return sorted(seen.values())

    def learn(self, uid: int, job: str, peers: list[PeerInfo], complete: bool) -> list[PeerInfo]:
        """``job``'s daemons as its ranks (of user ``uid``) found them: all of them (``complete``:
        they replace those told before, so a node that left the job is forgotten), or those found so
        far (added). Returns those not known for it before. Each user's jobs hold at most
        ``MAX_USER_PEERS`` endpoints and ``MAX_USER_JOBS`` jobs: past either, that user's jobs told
        longest ago are forgotten (never another user's); all users' jobs at most ``MAX_LEARNED_PEERS``
        distinct endpoints: past it, the telling is refused (LimitExceeded)."""
        if len(peers) > MAX_USER_PEERS:
            raise InvalidArgument(f"{len(peers)} peers for one job: at most {MAX_USER_PEERS}")
        told = {p.endpoint: p for p in peers if p.endpoint != self.own}
        with self._learned_lock:
            old = self._learned.pop((uid, job), {})
            mine = told if complete else {**old, **told}
            if len(mine) > MAX_USER_PEERS:
                if old:  # (refused: what it had stays)
                    self._learned[(uid, job)] = old
                raise InvalidArgument(f"{len(mine)} peers for job {job}: at most {MAX_USER_PEERS}")
            theirs = [k for k in self._learned if k[0] == uid]  # (oldest told first)
            gone: list[tuple[int, str]] = []
            while theirs and (len(theirs) >= MAX_USER_JOBS or len(
                    {e for k in theirs for e in self._learned[k]} | set(mine)) > MAX_USER_PEERS):
                gone.append(theirs.pop(0))
            total = len({e for k, v in self._learned.items() if k not in gone for e in v} | set(mine))
            if total > MAX_LEARNED_PEERS:
                if old:  # (refused: what it had stays)
                    self._learned[(uid, job)] = old
                raise LimitExceeded(f"the jobs on this daemon would have told it {total} peers: at most "
                                    f"{MAX_LEARNED_PEERS} (each is a thread and a socket); job {job} keeps "
                                    "the daemon's own peers and those it told before")
            for k in gone:
                del self._learned[k]
                log.info("peers learned for %s forgotten: uid %d's jobs hold at most %d jobs' and %d "
                         "peers", k[1], uid, MAX_USER_JOBS, MAX_USER_PEERS)
            self._learned[(uid, job)] = mine
        return sorted(p for e, p in mine.items() if old.get(e) != p)

    def learned_jobs(self) -> int:
        """How many jobs have peers their ranks told."""
        with self._learned_lock:
            return len(self._learned)

    def known(self) -> set[str]:
        """Every endpoint this daemon knows as a peer now, of any job."""
        with self._learned_lock:
            learned = {e for j in self._learned.values() for e in j}
        return learned | {p.endpoint for p in self.all()}

    def replica_targets(self, count: int, job: str | None = None) -> list[PeerInfo]:
        """The next ``count`` daemons after this one round the ring (``job``'s: the daemon's peers
        and the job's own), each on another node."""
        ring = sorted([*self.all(job=job), PeerInfo(self.own, self.node)])
        at = ring.index(PeerInfo(self.own, self.node))
        out: list[PeerInfo] = []
        for p in ring[at + 1:] + ring[:at]:
            if len(out) == count:
                break
            if p.node != self.node:
                out.append(p)
        return out

    # -- the directory's thread ----------------------------------------------------------------
    def _loop(self) -> None:
        published = -REPUBLISH_S
        while not self._stop.is_set():
            try:
                if time.monotonic() - published >= REPUBLISH_S:
                    published = time.monotonic()
                    self.publish()
                self.refresh()
            except Exception:  # a bug of ours must not end the thread: the peers found stay, and it goes on
                log.exception("the peer directory's pass failed")
                self._ready.set()
            self._stop.wait(RELOAD_S)

    def publish(self) -> None:
        """Write this daemon's entry where the other nodes read it (a file atomically; an object).
        Never raises: what was not written is logged, and written again at the next turn."""
        entry = self._entry()
        if self.directory is not None:
            try:
                self._write_file(entry)
            except InvalidArgument as e:
                log.warning("%s", e)
        if self.store is not None:
            try:
                self.store.put(self.store.key(BUCKET_DIR, f"{self.node}.peer"), entry)
            except SnapdError as e:  # (the store down now: the next turn writes it again)
                log.warning("this daemon's peer entry is not in the bucket yet: %s", e)

    def refresh(self) -> None:
        """One pass: list the entries, read those rewritten since the last pass."""
        listed = self._list()
        if listed is None:  # (neither could be listed now: the peers found before stay)
            self._ready.set()
            return
        changed = [n for n, tag in listed.items() if n not in self._read or self._read[n][0] != tag]
        for name in [n for n in changed if listed[n][-1] > MAX_ENTRY_BYTES]:  # (tags end with the size)
            log.warning("%s is not a peer's entry (%d bytes): ignored", name.partition(":")[2],
                        listed[name][-1])
            self._read[name] = (listed[name], None, 0.0)
            changed.remove(name)
        if changed:
            with ThreadPoolExecutor(min(READERS, len(changed)), "snapd-peer-entry") as pool:
                for name, got in zip(changed, pool.map(self._body, changed)):
                    if got is not None:  # (not read now: tried again at the next pass)
                        self._read[name] = (listed[name], *self._parse(name, got))
        for name in [n for n in self._read if n not in listed]:
            del self._read[name]
        now = time.time()
        self._found = [p for _, p, at in self._read.values() if p is not None and now - at <= STALE_S]
        self._ready.set()

    def _entry(self) -> bytes:
        return json.dumps({"endpoint": self.own, "node": self.node, "at": time.time()}).encode()

    def _write_file(self, entry: bytes) -> None:
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.node}.peer"
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_bytes(entry)
            os.replace(tmp, path)
        except OSError as e:
            raise InvalidArgument(f"peer_directory {self.directory}: cannot write this daemon's "
                                  f"endpoint: {e.strerror}") from None

    def _list(self) -> dict[str, Any] | None:
        """Each entry's name (``file:NAME``, ``object:KEY``) and tag; None if nothing could be listed."""
        out: dict[str, Any] = {}
        failed: set[str] = set()
        if self.directory is not None:
            try:
                for n in os.listdir(self.directory):
                    if n.endswith(".peer"):
                        try:
                            st = os.stat(self.directory / n)
                        except OSError:
                            continue
                        out[f"file:{n}"] = (st.st_mtime_ns, st.st_size)  # (a tag ends with the size)
            except OSError as e:
                log.warning("peer_directory %s: cannot list it: %s", self.directory, e.strerror)
                failed.add("file")
        if self.store is not None:
            try:
                for key, tag in self.store.list_tags(self.store.key(BUCKET_DIR) + "/").items():
                    if key.endswith(".peer"):
                        out[f"object:{key}"] = tag
            except SnapdError as e:
                log.warning("the remote tier's peer entries cannot be read: %s", e)
                failed.add("object")
        if len(failed) == (self.directory is not None) + (self.store is not None):
            return None
        for name, (tag, _, _) in self._read.items():  # (missing from a listing that failed: not gone)
            if name.partition(":")[0] in failed:
                out[name] = tag
        return out

    def _body(self, name: str) -> bytes | None:
        """The entry's bytes; None if it cannot be read now (gone since the listing, or an error)."""
        kind, _, where = name.partition(":")
        try:
            if kind == "file":
                assert self.directory is not None
                return read_regular(self.directory / where)  # (a FIFO planted there must not hang it)
            return self.store.get(where)
        except FileNotFoundError:
            return None
        except FormatError:  # (not a regular file: not an entry, until it changes)
            return b""
        except (OSError, SnapdError) as e:
            log.warning("peer entry %s not read: %s", where, e)
            return None

    @staticmethod
    def _parse(name: str, body: bytes) -> tuple[PeerInfo | None, float]:
        try:
            d = json.loads(body)
            at = float(d.get("at", time.time()))
            return PeerInfo(check_endpoint(d["endpoint"]), str(d["node"])[:128]), at
        except (ValueError, KeyError, TypeError, InvalidArgument) as e:
            log.warning("%s is not a peer's entry (%s): ignored", name.partition(":")[2], e)
            return None, 0.0
