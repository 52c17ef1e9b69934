"""Replication: each rank part this daemon makes is announced to every peer and copied to the next
``replicas`` daemons round the ring (snapd.peers.directory), in the background.

One thread per peer, each with its own link (snapd.peers.wire), so a peer that is down or slow holds
up only its own queue, never a snapshot or another peer. A queue sends announcements first (they
commit steps on nodes that share no filesystem), then each rank's newest part (taken last, as the
index orders latest, not the highest step): once a part is replicated, the older parts of the same
rank still queued for that peer are dropped (the newest first, as the issue of catching up asks). A
failed send waits 0.5 s, doubling up to 30 s, then tries again. All threads draw from one bandwidth
bound (``peer_bytes_per_s``), so replication cannot starve the job's collectives. A data file an
incremental part shares with the previous step (FORMAT.md section 9), which this thread replicated
to the same peer, is not sent again: the peer takes it from its replica of that step (``link``); if
it cannot, it is sent. A single process's snapshot, once committed, is queued the same way as rank 0
of 1 (``whole``: its files in its step's directory), never announced.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from snapd.daemon.outgoing import Outgoing
from snapd.errors import SnapdError
from snapd.format.global_manifest import part_dir
from snapd.format.jobdir import SNAPSHOT_RE, read_regular
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse
from snapd.peers import wire
from snapd.peers.directory import PeerDirectory, PeerInfo
from snapd.peers.keys import PeerKeys

log = logging.getLogger(__name__)

WINDOW = 8  # pieces in flight to one peer


class Sender:
    """The queue and thread of one peer."""

    def __init__(self, peer: PeerInfo, link: wire.Link, node: str, pace: Callable[[int], None]) -> None:
        self.peer, self.link, self.node, self.pace = peer, link, node, pace
        self.announce: list[Outgoing] = []
        self.replicate: list[Outgoing] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.up: bool | None = None
        self.last_error = ""
        self.failures = 0
        self.sent_bytes = 0
        self.replicated: dict[tuple[str, int], int] = {}  # (job, rank) -> the newest step replicated there
        self._sent: dict[tuple[str, int], str] = {}  # (job, rank) -> that part's manifest checksum
        self._retry_at = 0.0
        self._backoff = 0.5
        self.name = peer.node  # (the peer's own name once it answers)
        self.busy = False  # (an item taken off the queues is being sent)
        self.sending: Outgoing | None = None  # the part being sent: still lag until the peer holds it whole
        self.reaped = False  # (its peer is known no longer: the thread closes its link as it ends)
        self.thread = threading.Thread(target=self._loop, name=f"snapd-replicate-{peer.node}", daemon=True)

    def backlog(self) -> dict[str, Any]:
        with self.cond:
            sending = self.sending
            items = list(self.replicate) + ([sending] if sending is not None else [])
        now = time.monotonic()
        return {"endpoint": self.peer.endpoint, "node": self.name,
                "state": {None: "unknown", True: "up", False: "down"}[self.up],
                "backlog_parts": len(items), "backlog_bytes": sum(o.nbytes for o in items),
                "oldest_s": round(max((now - o.queued for o in items), default=0.0), 1),
                "sending": f"{sending.job} step {sending.step} rank {sending.rank}" if sending else None,
                "announcements": len(self.announce), "replicated_bytes": self.sent_bytes,
                "failures": self.failures, "last_error": self.last_error or None,
                "replicated_steps": {f"{j}:{r}": s for (j, r), s in sorted(self.replicated.items())}}

    def _next(self) -> tuple[str, Outgoing] | None:
        with self.cond:
            while not self.stopped:
                wait = self._retry_at - time.monotonic()
                if wait <= 0 and (self.announce or self.replicate):
                    self.busy = True
                    if self.announce:
                        return "announce", self.announce.pop(0)
                    o = self.sending = self._pick()
                    self.replicate.remove(o)
                    return "replicate", o
                self.cond.wait(wait if wait > 0 else None)
        return None

    def _pick(self) -> Outgoing:
        """The newest part of each rank of each job (after an outage, each catches up with its latest
        first), the one of them queued first."""
        newest: dict[tuple[str, int], Outgoing] = {}
        for o in self.replicate:
            k = (o.job, o.rank)
            if k not in newest or newest[k].newness < o.newness:
                newest[k] = o
        return min(newest.values(), key=lambda o: o.queued)

    def settled(self) -> bool:
        """Nothing left to send, or the peer is down (a drain does not wait for it)."""
        with self.cond:
            return self.up is False or not (self.busy or self.announce or self.replicate)

    def unfinished(self) -> list[str]:
        with self.cond:
            return [f"{o.job} step {o.step} rank {o.rank}" for o in self.replicate]

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            kind, o = item
            try:
                if kind == "announce":
                    header, _ = self.link.request(o.header("announce", node=self.node), o.manifest)
                    self.name = str(header.get("node") or self.name)[:128]
                else:
                    self._send_part(o)
                self.up, self._retry_at, self.last_error = True, 0.0, ""
                self._backoff = 0.5
            except (SnapdError, OSError, zmq.ZMQError) as e:
                self.failures += 1
                self.up = not isinstance(e, wire.PeerUnavailable)
                self.last_error = f"{type(e).__name__}: {e}"
                backoff = self._backoff
                self._retry_at = time.monotonic() + backoff
                self._backoff = min(30.0, backoff * 2)
                log.warning("replication to %s lags: %s %s step %d rank %d: %s (again in %.1f s)",
                            self.peer.endpoint, kind, o.job, o.step, o.rank, e, backoff)
                with self.cond:  # (refused: it will not take it later either)
                    if isinstance(e, wire.PeerRefused):
                        pass
                    elif kind == "announce":
                        self.announce.insert(0, o)
                    else:
                        self.replicate.append(o)
            except Exception:  # a bug of ours: this item is dropped, the peer's queue goes on
                log.exception("replication to %s: %s of %s step %d rank %d failed", self.peer.endpoint, kind,
                              o.job, o.step, o.rank)
            finally:
                with self.cond:
                    self.busy, self.sending = False, None
        if self.reaped:
            self.link.close()

    def _send_part(self, o: Outgoing) -> None:
        fds = o.open_files()
        if fds is None:
            log.info("%s step %d rank %d is gone before it reached %s: not replicated", o.job, o.step, o.rank,
                     self.peer.endpoint)
            return
        m = parse(o.manifest)
        try:
            t0 = time.monotonic()
            header, _ = self.link.request(o.header("replica", phase="begin", node=self.node), o.manifest)
            self.name = str(header.get("node") or self.name)[:128]  # (a single process's: never announced)
            from_step, linked = self._link_shared(o, m)
            for _ in self.link.pipeline(self._pieces(o, {n: fd for n, fd in fds.items() if n not in linked}),
                                        WINDOW):
                pass
            self.link.request(o.header("replica", phase="end"))
        finally:
            for fd in fds.values():
                os.close(fd)
        self.sent_bytes += o.nbytes - sum(linked.values())
        with self.cond:
            self.replicated[(o.job, o.rank)] = o.step  # (its newest: older ones queued are dropped)
            self._sent[(o.job, o.rank)] = m.checksum or ""
            self.replicate = [q for q in self.replicate if not (q.job == o.job and q.rank == o.rank
                                                                 and q.newness < o.newness)]
        log.info("%s step %d rank %d replicated to %s (%d MiB, %.2f s%s)", o.job, o.step, o.rank,
                 self.peer.endpoint, o.nbytes >> 20, time.monotonic() - t0,
                 f"; {sum(linked.values()) >> 20} MiB of it shared with step {from_step}, not sent"
                 if linked else "")

    def _link_shared(self, o: Outgoing, m: Manifest) -> tuple[int | None, dict[str, int]]:
        """Ask the peer to take each file ``o`` shares with the step this thread last replicated
        of its rank from its replica of that step: that step, and the files it took (their sizes)."""
        with self.cond:
            last, sent = self.replicated.get((o.job, o.rank)), self._sent.get((o.job, o.rank))
        out: dict[str, int] = {}
        same: bool | None = None  # (whether step ``last`` on this disk is the making sent)
        for f in m.files:
            # (shared_from: step-N/rank-R/FILE of a part, step-N/FILE of a single process's snapshot)
            where = str(f.get("shared_from", "")).split("/")
            step = SNAPSHOT_RE.match(where[0]) if len(where) == (2 if o.whole else 3) else None
            if step is None or int(step.group(1)) != last or not o.whole and where[1] != part_dir(o.rank):
                continue
            if same is None:  # (a step made again: the peer's copy is of the other making)
                same = sent is not None and self._checksum(o, where[0]) == sent
            if not same:
                continue
            try:
                self.link.request(o.header("replica", phase="link", file=f["name"], from_step=last,
                                           from_file=where[-1]))
                out[f["name"]] = int(f["bytes"])
            except wire.PeerRefused as e:  # (the peer no longer holds it: sent whole)
                log.info("%s step %d rank %d: %s sent whole to %s (%s)", o.job, o.step, o.rank, f["name"],
                         self.peer.endpoint, e)
        return last, out

    @staticmethod
    def _checksum(o: Outgoing, step_dir: str) -> str | None:
        """The manifest checksum of ``o``'s rank in ``step_dir`` of its job on this disk."""
        try:
            return parse(read_regular(o.job_dir / step_dir / o.files_dir / MANIFEST_NAME)).checksum
        except (OSError, SnapdError):
            return None

    def _pieces(self, o: Outgoing, fds: dict[str, int]) -> Iterator[tuple[dict, bytes]]:
        for name, fd in fds.items():
            size = os.fstat(fd).st_size
            for offset in range(0, size, wire.PIECE_BYTES):
                data = os.pread(fd, min(wire.PIECE_BYTES, size - offset), offset)
                self.pace(len(data))
                yield o.header("replica", phase="data", file=name, offset=offset), data


class Replication:
    def __init__(self, keys: PeerKeys, directory: PeerDirectory, pace: Callable[[int], None],
                 timeout_s: float) -> None:
        self.keys, self.directory, self.pace = keys, directory, pace
        self.timeout_s = timeout_s
        self.ctx = wire.context()  # (one socket per peer)
        self._senders: dict[str, Sender] = {}
        self._reaped: list[Sender] = []  # (their threads end on their own: a stop waits for them too)
        self._lock = threading.Lock()

    def _sender(self, peer: PeerInfo) -> Sender:
        with self._lock:
            s = self._senders.get(peer.endpoint)
            if s is None:
                link = wire.Link(self.ctx, self.keys, peer.endpoint, self.timeout_s)
                s = self._senders[peer.endpoint] = Sender(peer, link, self.directory.node, self.pace)
                s.thread.start()
            return s

    def add(self, o: Outgoing, replicas: int) -> None:
        """Announce a part to every peer of its job, and queue it for its ``replicas`` holders (any
        thread). A single process's snapshot, committed on its node already, is only queued."""
        targets = {p.endpoint for p in self.directory.replica_targets(replicas, o.job)}
        for peer in self.directory.all(job=o.job):
            if o.whole and peer.endpoint not in targets:
                continue
            s = self._sender(peer)
            with s.cond:
                if not o.whole:
                    s.announce.append(o)
                    o.announced.add(peer.endpoint)
                if peer.endpoint in targets:
                    s.replicate.append(o)
                s.cond.notify()

    def announce_new(self, o: Outgoing) -> None:
        """Announce a part still waiting for its step to the peers found since it was made (a
        daemon that started later, or one its ranks told since: it may hold the step's other ranks)."""
        for peer in self.directory.all(job=o.job):
            if peer.endpoint not in o.announced:
                s = self._sender(peer)
                with s.cond:
                    s.announce.append(o)
                    o.announced.add(peer.endpoint)
                    s.cond.notify()

    def reap(self, known: set[str]) -> None:
        """End the threads of peers no longer known (a job's ranks told its daemons anew, without
        them) that have nothing left to send, or are down: the threads stay as many as the peers."""
        with self._lock:
            for endpoint, s in list(self._senders.items()):
                with s.cond:
                    if endpoint in known or not (s.up is False or not (s.busy or s.announce or s.replicate)):
                        continue
                    s.stopped = s.reaped = True
                    s.cond.notify()
                del self._senders[endpoint]
                self._reaped = [r for r in self._reaped if r.thread.is_alive()] + [s]
                log.info("replication to %s ends: no job has it as a peer now", endpoint)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            senders = list(self._senders.values())
        return [s.backlog() for s in senders]

    def settled(self) -> bool:
        """Whether every part made here has reached its replica holders that answer (a drain's wait)."""
        with self._lock:
            senders = list(self._senders.values())
        return all(s.settled() for s in senders)

    def unfinished(self) -> list[str]:
        with self._lock:
            senders = list(self._senders.values())
        return [f"{line} (to {s.peer.endpoint})" for s in senders for line in s.unfinished()]

    def stop(self) -> None:
        with self._lock:
            senders = list(self._senders.values()) + self._reaped
        for s in senders:
            with s.cond:
                s.stopped = True
                s.cond.notify()
        stuck = 0
        for s in senders:
            s.thread.join(timeout=self.timeout_s + 1)
            if s.thread.is_alive():  # (its socket is still in use: left to the process's exit)
                stuck += 1
            else:
                s.link.close()
        if not stuck:
            self.ctx.term()
