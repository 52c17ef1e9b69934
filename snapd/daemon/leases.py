"""Who holds which host buffer, who waits for one, and how many one client may hold.

A lease is a host buffer granted to a client: held from ``acquire`` until its
snapshot is persisted (or the lease is released, or the client goes away, or
its bytes are written and an emergency snapshot waits: snapd.daemon.waiting).
Requests that find no free buffer, or whose client is at its limit, queue as
waiters; emergency requests jump the queue, and a draining daemon grants them
only. The server thread is the only caller, so nothing here locks; buffers made
on the pool's threads come back through a queue and an event (``replaced``);
``buffer_making`` keeps what each is made for.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from snapd import protocol
from snapd.daemon.buffer_making import BufferMaker
from snapd.daemon.buffers import BufferPool, HostBuffer
from snapd.daemon.config import DaemonConfig
from snapd.daemon.host_memory import grown_size
from snapd.daemon.limits import Limits
from snapd.daemon.metrics import Metrics
from snapd.daemon.sessions import Session
from snapd.daemon.tasks import TaskTable
from snapd.daemon.waiting import Waiter, expire, notify
from snapd.errors import Busy, LimitExceeded, ProtocolError, ShuttingDown, SnapdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Room:
    """Where a snapshot can go now (``Leases._room_for``): ``buf`` as it is; or ``buf`` made anew
    first, of ``make`` bytes (grown, or fresh pages for another uid); or, with ``claim``, ``buf``
    being made ahead of need, which the request waits for rather than for one of its own."""

    buf: HostBuffer
    make: int | None = None
    claim: bool = False

    @property
    def ready(self) -> bool:
        return self.make is None and not self.claim


class Leases:
    """The host buffers' leases and the queue for them.

    ``sessions`` and ``tasks`` are the server's (read, never changed here): a
    client's snapshots in flight count against its limits. ``replies`` delivers a
    grant that was waiting; ``hand_over`` runs a snapshot's hand-over after it.
    """

    def __init__(self, config: DaemonConfig, pool: BufferPool, metrics: Metrics,
                 sessions: dict[bytes, Session],
                 tasks: TaskTable, replies: Any, hand_over: Callable[[Any], None],
                 post: Callable[[dict], None], shared: bool = False) -> None:
        self.config, self.pool, self.metrics = config, pool, metrics
        self.sessions, self.tasks, self.replies, self._hand_over = sessions, tasks, replies, hand_over
        self.maker = BufferMaker(config, pool, post)
        self._post = post
        self._said_full = False
        self.waiters: collections.deque[Waiter] = collections.deque()
        self._ids = iter(range(1, 2**62))
        self._asked: dict[int, float] = {}  # lease -> when its acquire arrived (the stall metric)
        self.limits = Limits(config, pool, sessions, tasks, shared)

    def new_id(self) -> int:
        """A fresh id (leases and registered regions share the sequence)."""
        return next(self._ids)

    def acquire(self, s: Session, req_id: int, nbytes: int, emergency: bool, then: Any = None) -> Any:
        """The grant reply, or None when the request waits; ``Busy`` for a client that skips.
        With ``then`` (a snapshot without a lease): what ``then(lease, waited_s)`` returns, at once
        or, when the request waits, once a buffer is granted (None here then). A free buffer that
        must first be replaced (grown for ``nbytes``, or fresh pages for another uid) is made on a
        thread while the request waits (a skipping client's snapshot is skipped instead)."""
        at_limit = self.limits.reached(s, emergency)
        if not at_limit and not (self.eligible_waiter() and not emergency):
            room = self._room_for(s.uid, nbytes)
            if room is not None and room.ready:
                if then is not None:
                    return then(self._lease(s, room.buf), 0.0)
                return self._grant(s, room.buf, req_id)
            if room is not None:
                w = self._queue(s, req_id, nbytes, emergency, then, "a host buffer is being made for it") \
                    if s.on_busy != "skip" or emergency else None
                if room.make is not None:
                    self._replace(room.buf, room.make, s.uid, w)
                elif w is not None:
                    self.maker.claim(room.buf, w)
                if w is None:
                    raise Busy(f"host buffer {room.buf.index} is being made ready for snapshots of this size "
                               f"({self.maker.size_of(room.buf)} bytes): this one is skipped, a later one "
                               "gets it")
                return None
        if s.on_busy == "skip" and not emergency:
            if at_limit:
                raise Busy(f"this client holds {self.limits.held(s)} host buffer(s), its limit ({at_limit})")
            raise Busy(f"all {len(self.pool.buffers)} host buffers are busy persisting earlier snapshots, "
                       f"and max_host_memory_bytes ({self.config.memory_cap}) or the memory left has no room "
                       "for another")
        self._queue(s, req_id, nbytes, emergency, then,
                    f"this client is at its limit, {at_limit}" if at_limit else
                    "every host buffer is busy persisting earlier snapshots, with no room for another")
        if emergency:  # a written snapshot's buffer, lent after this request (waiting.lend_written)
            self._post({"event": "written"})
        return None  # granted later, when a buffer frees

    def _room_for(self, uid: int, nbytes: int) -> Room | None:
        """Where a snapshot of ``nbytes`` for ``uid`` can go now: a free buffer that serves as it is,
        one being made ahead of need that will, one to replace first, or a slot for one more buffer
        when none is free and memory allows; None: wait for one to free. LimitExceeded when the free
        buffer cannot grow as far."""
        c, pool = self.config, self.pool
        buf = pool.free(nbytes, uid)
        if (buf is None or not pool.serves(buf, uid, nbytes)) and nbytes > c.host_buffer_bytes:
            ahead = self.maker.made_ahead(uid, nbytes)
            if ahead is not None:
                return Room(ahead, claim=True)
        if buf is not None:
            size = pool.replacement_size(buf, uid, nbytes, c.buffer_cap)
            if size is not None and pool.total() - buf.size + size > c.memory_cap:
                raise LimitExceeded(f"a snapshot of {nbytes} bytes needs host buffer {buf.index} grown to "
                                    f"{size} bytes: with the others over max_host_memory_bytes "
                                    f"({c.memory_cap})")
            return Room(buf, size)
        # one more buffer, sized for this request (in 64 MiB steps), not a starting buffer's size: a
        # small state's snapshot then waits for 64 MiB of pages to be touched, not gigabytes
        size = grown_size(nbytes, c.buffer_cap)
        size = size if nbytes > c.host_buffer_bytes else min(size, c.host_buffer_bytes)
        why = self.maker.no_room(size)
        if why:
            if not self._said_full:  # (once a daemon's life: an operator's hint, not a per-snapshot line)
                self._said_full = True
                log.warning("all %d host buffers busy and no room for another of %d MiB (%s): snapshots "
                            "wait for one to be persisted; raise max_host_memory_bytes (and MemoryMax) for "
                            "none to wait", len(pool.buffers), size >> 20, why)
            return None
        return Room(pool.reserve(size), size)

    def expect(self, s: Session) -> None:
        """``s``'s job resumes: buffers ready for its first snapshot (BufferMaker.expect)."""
        self.maker.expect(s, self.sessions)
        self.gauges()

    def restore_start(self) -> None:
        """No client left: added buffers go, grown ones are made anew at the starting size."""
        self.maker.restore_start()
        self.gauges()

    def _queue(self, s: Session, req_id: int, nbytes: int, emergency: bool, then: Any, why: str) -> Waiter:
        w = Waiter(s.peer, req_id, nbytes, emergency, time.monotonic(), then)
        if emergency:
            self.waiters.appendleft(w)
        else:
            self.waiters.append(w)
        notify(self, s, w, why)
        return w

    def _replace(self, buf: HostBuffer, size: int, uid: int, w: Waiter | None) -> None:
        """Have ``buf`` replaced on a thread; ``replaced`` takes it from there on this one."""
        self.maker.start(buf, size, uid, w)
        self.gauges()

    def replaced(self) -> None:
        """Buffers made on the pool's threads go into the pool, and to the requests waiting for them;
        a request whose buffer could not be made hears why."""
        for w, why in self.maker.collect():
            if w in self.waiters:
                self.waiters.remove(w)
                self.replies.send(w.peer, protocol.error_reply(w.req_id, LimitExceeded.code, why))
        self.gauges()
        self._grant_waiters()

    def take(self, s: Session, lease: int) -> Any:
        """The buffer of ``lease``, which ``s`` must hold, for the snapshot it is about to send."""
        buf = self.pool.by_lease(lease)
        if buf is None or lease not in s.leases:
            raise ProtocolError(f"lease {lease} is not yours: acquire a buffer first", "bad_lease")
        return buf

    def copied(self, lease: int) -> None:
        """The snapshot's bytes are in the buffer: the trainer's stall for it ended."""
        self.metrics.stall.observe(time.monotonic() - self._asked.pop(lease, time.monotonic()))
        self.maker.copied(self.pool.by_lease(lease))

    def free(self, s: Session | None, lease: int) -> None:
        """Give the buffer back, and to the first eligible waiter if any."""
        if s is not None:
            s.leases.discard(lease)
        buf = self.pool.by_lease(lease)
        self._asked.pop(lease, None)
        if buf is None:
            return
        self.maker.copied(buf)
        self.pool.make_whole(buf)
        buf.lease = None
        self.gauges()
        self._grant_waiters()

    def _grant_waiters(self) -> None:
        """Free buffers to the eligible waiters, first come first served (emergencies first); a
        buffer that must be replaced for one is made while others take the remaining buffers."""
        self.waiters = collections.deque(w for w in self.waiters if w.peer in self.sessions)
        while True:
            w = self.eligible_waiter()
            if w is None:
                return
            ws = self.sessions[w.peer]
            try:
                room = self._room_for(ws.uid, w.nbytes)
            except SnapdError as e:
                self.waiters.remove(w)
                self.replies.send(w.peer, protocol.error_reply(w.req_id, e.code, str(e)))
                continue
            if room is None:
                return
            buf = room.buf
            if room.claim:
                self.maker.claim(buf, w)
                continue
            if room.make is not None:
                self._replace(buf, room.make, ws.uid, w)
                continue
            self.waiters.remove(w)
            handoff = None
            waited = time.monotonic() - w.since
            try:
                if w.then is not None:
                    reply, handoff = w.then(self._lease(ws, buf, waited), waited)
                else:
                    reply = self._grant(ws, buf, w.req_id, waited)
            except Exception as e:  # refused (or a bug of ours): the lease goes back, the loop goes on
                if not isinstance(e, SnapdError):
                    log.exception("internal error granting a waiting request")
                if buf.lease in ws.leases:
                    self.free(ws, buf.lease)
                reply = protocol.error_reply(w.req_id, getattr(e, "code", "internal"), str(e))
            self.replies.send(w.peer, reply)
            if handoff is not None:
                self._hand_over(handoff)

    def release_all(self, s: Session) -> None:
        for lease in list(s.leases):
            self.free(s, lease)
        self.waiters = collections.deque(w for w in self.waiters if w.peer != s.peer)

    def expire_waiters(self, now: float) -> None:
        """Bound every wait (snapd.daemon.waiting)."""
        expire(self, now)

    def refuse_waiters(self) -> None:
        """Draining: every queued request but the emergency snapshots' hears why."""
        for w in [w for w in self.waiters if not w.emergency]:
            self.waiters.remove(w)
            why = "the daemon is shutting down and accepts only emergency snapshots"
            self.replies.send(w.peer, protocol.error_reply(w.req_id, ShuttingDown.code, why))

    def gauges(self) -> None:
        busy = sum(b.size for b in self.pool.buffers if b.lease is not None)
        self.metrics.buffers(busy, sum(b.size for b in self.pool.buffers) - busy)
        self.metrics.clients.set(len(self.sessions))

    def eligible_waiter(self) -> Waiter | None:
        """The first queued request whose client is under its limits (it gets the next free buffer)."""
        preparing = self.maker.waited_for()
        for w in self.waiters:
            ws = self.sessions.get(w.peer)
            if id(w) in preparing:  # its buffer is being made
                continue
            if ws is not None and not self.limits.reached(ws, w.emergency):
                return w
        return None

    def _lease(self, s: Session, buf: Any, waited_s: float = 0.0) -> int:
        buf.lease = self.new_id()
        s.leases.add(buf.lease)
        self._asked[buf.lease] = time.monotonic() - waited_s
        self.gauges()
        return buf.lease

    def _grant(self, s: Session, buf: Any, req_id: int, waited_s: float = 0.0) -> bytes:
        buf = self.pool.by_lease(self._lease(s, buf, waited_s))
        return protocol.message("granted", req_id, lease=buf.lease, buffer=buf.index, path=str(buf.path),
                                bytes=buf.size, waited_s=waited_s)
