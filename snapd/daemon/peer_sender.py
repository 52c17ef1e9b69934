"""One peer's queue and thread (snapd.daemon.replication): the announcements and replicas this
daemon sends it, in order (announcements first, then each rank's newest part), a failed send tried
again after 0.5 s doubling up to 30 s, and the check that the peer still holds what it was sent.

A peer that restarted (an upgrade, a crash) lost the replicas it held in memory, and one may drop a
copy (its replica_dir wiped): nothing told the sender, which went on counting them as held until
the next snapshot. So, every ``peer_check_s`` while its queue is empty, the thread asks the peer
what it holds of each job (``have``) and queues again the newest part of each rank it no longer
holds, while that part is still on this node. A holder that refuses it (no room) is offered it
again only after ``peer_check_s``, doubling up to an hour.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from snapd.daemon.outgoing import Outgoing, newest_by_rank
from snapd.errors import SnapdError
from snapd.format.manifest import Manifest, parse
from snapd.peers import wire
from snapd.peers.directory import PeerInfo

log = logging.getLogger(__name__)

WINDOW = 8  # pieces in flight to one peer
# a holder that refused a part it lost (no room, no replica_dir any more) is asked to take it again
# after check_s, doubling up to this: room may come, but each ask is a warning and its manifest
REFUSED_MAX_S = 3600.0


class Sender:
    """The queue and thread of one peer."""

    def __init__(self, peer: PeerInfo, link: wire.Link, node: str, pace: Callable[[int], None],
                 check_s: float = 30.0, on_held: Callable[[], None] = lambda: None) -> None:
        self.peer, self.link, self.node, self.pace, self.check_s = peer, link, node, pace, check_s
        self.on_held = on_held  # (what the peer holds changed: snapd.daemon.held_record keeps it)
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
        self._held: dict[tuple[str, int], Outgoing] = {}  # (job, rank) -> that part: checked still held
        self._checked = time.monotonic()  # (the last time the peer answered: its holdings checked then)
        self.resent = 0  # parts sent again: the peer no longer held them
        self._resending: dict[tuple[str, int], int] = {}  # (job, rank) -> the step queued again by a check
        # (job, rank) -> (the step the peer refused, not offered again before, the wait after that)
        self._refused: dict[tuple[str, int], tuple[int, float, float]] = {}
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
                "failures": self.failures, "last_error": self.last_error or None, "resent_parts": self.resent,
                "replicated_steps": {f"{j}:{r}": s for (j, r), s in sorted(self.replicated.items())}}

    def _next(self) -> tuple[str, Outgoing | None] | None:
        with self.cond:
            while not self.stopped:
                now = time.monotonic()
                wait = self._retry_at - now
                if wait <= 0 and (self.announce or self.replicate):
                    self.busy = True
                    if self.announce:
                        return "announce", self.announce.pop(0)
                    o = self.sending = self._pick()
                    self.replicate.remove(o)
                    return "replicate", o
                if wait <= 0 and self._held:  # (idle: is what it was sent still there?)
                    wait = self._checked + self.check_s - now
                    if wait <= 0:
                        self.busy = True
                        return "check", None
                self.cond.wait(wait if wait > 0 else None)
        return None

    def _pick(self) -> Outgoing:
        """The newest part of each rank of each job (after an outage, each catches up with its latest
        first), the one of them queued first."""
        return min(newest_by_rank(self.replicate).values(), key=lambda o: o.queued)

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
            what = f"{kind} {o.job} step {o.step} rank {o.rank}" if o is not None else "asking what it holds"
            try:
                if o is None:
                    self._check()
                elif kind == "announce":
                    header, _ = self.link.request(o.header("announce", node=self.node), o.manifest)
                    self.name = str(header.get("node") or self.name)[:128]
                else:
                    self._send_part(o)
                self.up, self._retry_at, self.last_error = True, 0.0, ""
                self._backoff = 0.5
                self._checked = time.monotonic()
            except (SnapdError, OSError, zmq.ZMQError) as e:
                self.failures += 1
                # (a holder down for long is asked every check: said once, then at info level)
                level = logging.INFO if o is None and self.up is False else logging.WARNING
                self.up = not isinstance(e, wire.PeerUnavailable)
                self.last_error = f"{type(e).__name__}: {e}"
                backoff = self._backoff
                self._retry_at = time.monotonic() + backoff
                self._backoff = min(30.0, backoff * 2)
                if isinstance(e, wire.PeerRefused) and kind == "replicate" and o is not None:
                    level, after = self._was_refused(o)
                    log.log(level, "replication to %s: %s refused: %s (offered again in %.0f s, or with its "
                            "rank's next part)", self.peer.endpoint, what, e, after)
                else:
                    log.log(level, "replication to %s lags: %s: %s (again in %.1f s)", self.peer.endpoint,
                            what, e, backoff)
                with self.cond:  # (refused: it will not take it later either)
                    if isinstance(e, wire.PeerRefused) or o is None:
                        pass
                    elif kind == "announce":
                        self.announce.insert(0, o)
                    else:
                        self.replicate.append(o)
            except Exception:  # a bug of ours: this item is dropped, the peer's queue goes on
                log.exception("replication to %s: %s failed", self.peer.endpoint, what)
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
            for _ in self.link.pipeline(o.pieces({n: fd for n, fd in fds.items() if n not in linked},
                                                 self.pace), WINDOW):
                pass
            self.link.request(o.header("replica", phase="end"))
        finally:
            for fd in fds.values():
                os.close(fd)
        self.sent_bytes += o.nbytes - sum(linked.values())
        with self.cond:
            self._refused.pop((o.job, o.rank), None)
            if self._resending.get((o.job, o.rank)) == o.step:
                del self._resending[(o.job, o.rank)]
                self.resent += 1
            self.replicated[(o.job, o.rank)] = o.step  # (its newest: older ones queued are dropped)
            had = self._held.get((o.job, o.rank))
            if had is None or had.newness <= o.newness:
                self._held[(o.job, o.rank)] = o
            self._sent[(o.job, o.rank)] = m.checksum or ""
            self.replicate = [q for q in self.replicate if not (q.job == o.job and q.rank == o.rank
                                                                 and q.newness < o.newness)]
        self.on_held()
        log.info("%s step %d rank %d replicated to %s (%d MiB, %.2f s%s)", o.job, o.step, o.rank,
                 self.peer.endpoint, o.nbytes >> 20, time.monotonic() - t0,
                 f"; {sum(linked.values()) >> 20} MiB of it shared with step {from_step}, not sent"
                 if linked else "")

    def _was_refused(self, o: Outgoing) -> tuple[int, float]:
        """The peer refused ``o``: how loudly to say it (the first refusal of this part is a warning),
        and how long until a check offers it again (``peer_check_s``, doubling at each refusal)."""
        with self.cond:
            step, _, wait = self._refused.get((o.job, o.rank), (None, 0.0, 0.0))
            again = step == o.step
            wait = min(REFUSED_MAX_S, 2 * wait) if again else self.check_s
            self._refused[(o.job, o.rank)] = (o.step, time.monotonic() + wait, wait)
        return (logging.INFO if again else logging.WARNING), wait

    def held(self) -> list[tuple[str, int, int, bool]]:
        """The newest part of each rank the peer holds or is owed (queued, being sent): what a
        restart of this daemon checks it holds, and sends it where it does not."""
        with self.cond:
            owed = [*self._held.values(), *self.replicate, *([self.sending] if self.sending else [])]
        return [(o.job, o.step, o.rank, o.whole) for o in newest_by_rank(owed).values()]

    def seed(self, o: Outgoing) -> None:
        """``o`` was sent to the peer by this daemon's last run: checked (soon) like what this one sent."""
        with self.cond:
            had = self._held.get((o.job, o.rank))
            if had is None or had.newness < o.newness:
                self._held[(o.job, o.rank)] = o
                self._checked = 0.0
                self.cond.notify()

    def forget_older(self, o: Outgoing) -> None:
        """``o``, a newer part of the same rank, goes to other holders: this peer is not asked for
        the older one any more (it drops it once the newer step is complete there, and sending it
        again each check would go on for ever)."""
        with self.cond:
            had = self._held.get((o.job, o.rank))
            if had is None or had.newness >= o.newness:
                return
            del self._held[(o.job, o.rank)]
        self.on_held()

    def _check(self) -> None:
        """Queue again the newest part of each rank sent to the peer that it no longer holds (it
        restarted, or dropped it) and that is still on this node."""
        with self.cond:
            last = dict(self._held)
        for job in sorted({j for j, _ in last}):
            header, _ = self.link.request({"t": "have", "job": job, "brief": True})
            steps = header.get("steps")
            entries = [e for e in (steps if isinstance(steps, list) else [])
                       if isinstance(e, dict) and isinstance(e.get("parts"), dict)]
            held = {(e.get("step"), r) for e in entries for r in e["parts"]}
            for (j, rank), o in last.items():
                if j != job or (o.step, str(rank)) in held:
                    continue
                with self.cond:  # (it refused this part lately: offered again only after a while)
                    refused = self._refused.get((j, rank))
                    if refused is not None and refused[0] == o.step and time.monotonic() < refused[1]:
                        continue
                fds = o.open_files()  # (still here?)
                for fd in (fds or {}).values():
                    os.close(fd)
                with self.cond:
                    if self._held.get((j, rank)) is not o:
                        continue  # (a newer part was sent meanwhile)
                    if fds is None:  # (gone here too: retention, or a newer making of its step)
                        del self._held[(j, rank)]
                    elif not any(q.job == j and q.rank == rank for q in self.replicate):
                        self.replicate.append(dataclasses.replace(o, queued=time.monotonic()))
                        self._resending[(j, rank)] = o.step
                if fds is None:
                    self.on_held()
                    continue
                log.log(logging.INFO if refused is not None else logging.WARNING,
                        "%s (%s) no longer holds %s step %d rank %d (it restarted, or dropped it): sending "
                        "it again", self.peer.endpoint, self.name, j, o.step, rank)

    def _link_shared(self, o: Outgoing, m: Manifest) -> tuple[int | None, dict[str, int]]:
        """Ask the peer to take each file ``o`` shares with the step this thread last replicated
        of its rank from its replica of that step: that step, and the files it took (their sizes)."""
        with self.cond:
            last, sent = self.replicated.get((o.job, o.rank)), self._sent.get((o.job, o.rank))
        if last is None or sent is None:
            return last, {}
        files = o.shared_with(m, last)
        if not files or o.checksum_at(last) != sent:  # (a step made again since: the peer's is the other)
            return last, {}
        out: dict[str, int] = {}
        for name, from_file, nbytes in files:
            try:
                self.link.request(o.header("replica", phase="link", file=name, from_step=last,
                                           from_file=from_file))
                out[name] = nbytes
            except wire.PeerRefused as e:  # (the peer no longer holds it: sent whole)
                log.info("%s step %d rank %d: %s sent whole to %s (%s)", o.job, o.step, o.rank, name,
                         self.peer.endpoint, e)
        return last, out
