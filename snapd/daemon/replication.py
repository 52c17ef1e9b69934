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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapd.daemon import held_record
from snapd.daemon.outgoing import Outgoing
from snapd.daemon.peer_sender import Sender
from snapd.peers import wire
from snapd.peers.directory import PeerDirectory, PeerInfo
from snapd.peers.keys import PeerKeys

log = logging.getLogger(__name__)


class Replication:
    def __init__(self, keys: PeerKeys, directory: PeerDirectory, pace: Callable[[int], None],
                 timeout_s: float, check_s: float = 30.0, root: Path | None = None) -> None:
        self.keys, self.directory, self.pace = keys, directory, pace
        self.timeout_s, self.check_s = timeout_s, check_s
        self.root = root  # (where held_record keeps what the holders were sent; None: nowhere)
        self._record_lock = threading.Lock()
        self._unclaimed: held_record.Held = {}  # (what the last run sent peers not known yet)
        self.ctx = wire.context()  # (one socket per peer)
        self._senders: dict[str, Sender] = {}
        self._reaped: list[Sender] = []  # (their threads end on their own: a stop waits for them too)
        self._lock = threading.Lock()

    def _sender(self, peer: PeerInfo) -> Sender:
        with self._lock:
            s = self._senders.get(peer.endpoint)
            if s is None:
                link = wire.Link(self.ctx, self.keys, peer.endpoint, self.timeout_s)
                s = Sender(peer, link, self.directory.node, self.pace, self.check_s, self._record)
                self._senders[peer.endpoint] = s
                s.thread.start()
            return s

    def _record(self) -> None:
        """What each holder holds changed (a sender's thread): the record is written anew."""
        if self.root is None:
            return
        with self._record_lock:
            with self._lock:
                senders = list(self._senders.values())
            held = {s.peer.endpoint: s.held() for s in senders}
            # (what the last run sent peers not known yet stays until they are: claim_record)
            held.update({ep: parts for ep, parts in self._unclaimed.items() if ep not in held})
            held_record.save(self.root, held)

    def take_up_record(self) -> None:
        """What this daemon's last run sent its holders, handed to their senders to check (a thread
        of the peers' pool, at start: the directory's first read may take seconds). The entries of
        peers not known yet wait for a job's ranks to tell them (``claim_record``)."""
        if self.root is None:
            return
        record = held_record.load(self.root)
        with self._record_lock:
            self._unclaimed = record
        self.claim_record({p.endpoint: p for p in self.directory.all(wait_s=5.0)})

    def claim_record(self, peers: dict[str, PeerInfo]) -> None:
        """The recorded parts sent to ``peers`` (known now) go to their senders to be checked."""
        if self.root is None:
            return
        with self._record_lock:
            mine = {ep: self._unclaimed.pop(ep) for ep in list(self._unclaimed) if ep in peers}
        n = 0
        for endpoint, parts in mine.items():
            s = self._sender(peers[endpoint])
            for job, step, rank, whole in parts:
                o = held_record.outgoing(self.root, job, step, rank, whole)
                if o is not None:
                    s.seed(o)
                    n += 1
        if mine:
            log.info("%d part(s) this daemon's last run sent %d holder(s): checked that they still hold them",
                     n, len(mine))

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
        with self._lock:
            others = [s for ep, s in self._senders.items() if ep not in targets]
        for s in others:  # (the ring changed: its older part's holder is no longer asked for it)
            s.forget_older(o)
        if targets:  # (owed from now: a restart before it is sent still sends it)
            self._record()

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
