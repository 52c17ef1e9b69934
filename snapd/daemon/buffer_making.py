"""Host buffers being made, and what each is made for.

The pool makes a buffer on a thread of its own (``BufferPool.replace``): grown for a snapshot
larger than the one it was granted, added when every buffer is busy, remade with fresh pages for
another uid, remade at the starting size once a job has ended, or grown ahead of need. This keeps,
for each, the request waiting for it, until it comes back on the server thread (``collect``),
which alone changes the pool.

Growing ahead. When a starting buffer grows for a request, each other free starting buffer gets a
grown successor, as memory allows: without it the double buffer holds only one buffer of the grown
state's size, and the next snapshot that comes while the first is still being persisted waits
about 0.6 s a GiB for its buffer to be made; the one that matters most is the emergency snapshot
at preemption, which has seconds. The successor is made once the grown buffer's first snapshot is
in it (not during that snapshot's copy, which it would slow). And when a job that resumes
connects (its index records its last snapshot's size), each starting buffer smaller than that
gets one, and buffers are added so that each client connected for such a job (the ranks of a
node) has one, in the background (lowest priority: the trainer is restoring), so that even its
first snapshot finds a buffer ready. A successor is made beside the buffer it succeeds, in a slot of
its own, so that the smaller buffer serves on meanwhile; once made it takes that buffer's place
if that buffer is free then, and is otherwise one buffer more (a job's end gives it back). A
request that would need as large a buffer waits for a successor being made (and hurries it)
rather than having its own made.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from snapd.daemon.buffers import BufferPool, HostBuffer, owner_uid, serves_uid
from snapd.daemon.config import DaemonConfig
from snapd.daemon.host_memory import grown_size, room_to_grow
from snapd.daemon.sessions import Session
from snapd.format.index import latest_raw_bytes
from snapd.format.jobdir import JobDir

log = logging.getLogger(__name__)


@dataclass
class Making:
    """A buffer being made: ``size`` bytes for ``uid``, for ``waiter`` (a leases.Waiter; None: for
    no request, or for a skipping client's, which does not wait), or ``ahead`` of need, as the
    successor of buffer ``succeeds`` or as one more (a request that would need as large a buffer
    waits for it instead, as its ``waiter``)."""
    size: int
    uid: int
    waiter: Any = None
    ahead: bool = False
    succeeds: int | None = None


class BufferMaker:
    """The buffers of ``pool`` being made. ``post`` wakes the server thread (from any thread)."""

    def __init__(self, config: DaemonConfig, pool: BufferPool, post: Callable[[dict], None]) -> None:
        self.config, self.pool, self._post = config, pool, post
        self.making: dict[int, Making] = {}  # buffer index -> what it is being made for
        self._made: queue.SimpleQueue[tuple[HostBuffer, str]] = queue.SimpleQueue()  # from the pool's threads
        self._kept_grown: set[int] = set()  # buffers whose remaking at the starting size failed: not retried
        self._grow_after: set[int] = set()  # grown starting buffers whose first snapshot is not in yet

    def start(self, buf: HostBuffer, size: int, uid: int, waiter: Any, ahead: bool = False,
              succeeds: int | None = None, background: bool = False) -> None:
        """Have ``buf`` (or a slot) replaced by a fresh buffer of ``size`` for ``uid``, on a thread
        (``background``: BufferPool.replace's)."""
        self.making[buf.index] = Making(size, uid, waiter, ahead, succeeds)

        def done(new: HostBuffer, why: str) -> None:  # (the pool's thread)
            self._made.put((new, why))
            self._post({"event": "buffer_ready"})
        self.pool.replace(buf, size, uid, done, background)

    def waited_for(self) -> set[int]:
        """The ids of the requests waiting for a buffer being made (no other is granted them)."""
        return {id(m.waiter) for m in self.making.values() if m.waiter is not None}

    def made_ahead(self, uid: int, nbytes: int) -> HostBuffer | None:
        """A buffer being made ahead of need for ``uid`` that will hold ``nbytes``, and that no
        request waits for yet (the caller's will: ``claim``)."""
        for b in self.pool.buffers:
            m = self.making.get(b.index)
            if m is not None and m.ahead and m.waiter is None and m.size >= nbytes and serves_uid(m.uid, uid):
                return b
        return None

    def claim(self, buf: HostBuffer, waiter: Any) -> None:
        """``waiter`` waits for ``buf``, made ahead of need: it is made at full speed from now on."""
        self.making[buf.index].waiter = waiter
        self.pool.hurry(buf.index)

    def size_of(self, buf: HostBuffer) -> int:
        return self.making[buf.index].size

    def collect(self) -> list[tuple[Any, str]]:
        """The buffers made since the last call go into the pool (a slot whose buffer could not be
        made leaves it). Returns (waiter, why) for each request whose own buffer could not be made;
        one that waited for a buffer made ahead waits on for any other."""
        failed = []
        while not self._made.empty():
            new, why = self._made.get()
            m = self.making.pop(new.index, None) or Making(new.size, new.uid)
            new.lease = None
            if not why:
                self.pool.install(new, m.ahead)
                c = self.config
                self._grow_after.discard(new.index)
                if m.succeeds is not None:
                    self._succeed(new, m.succeeds)
                elif new.index < c.host_buffers and new.size > c.host_buffer_bytes:
                    self._grow_after.add(new.index)
                continue
            if new.mm is None:  # a slot: no buffer was added
                self.pool.drop(new)
            elif m.waiter is None and not m.ahead:  # restore_start's: it keeps the grown one (logged why)
                self._kept_grown.add(new.index)
            if m.waiter is not None and not m.ahead:
                failed.append((m.waiter, why))
        return failed

    def copied(self, buf: HostBuffer | None) -> None:
        """A snapshot's bytes are in ``buf`` (or its lease was given back): if it is a starting
        buffer that grew for it, the others grow ahead now."""
        if buf is not None and buf.index in self._grow_after:
            self._grow_after.discard(buf.index)
            self.grow_ahead(buf.size, owner_uid(buf.uid), f"as buffer {buf.index} did")

    def no_room(self, size: int) -> str:
        """Why one more buffer of ``size`` cannot be had now ('' when it can)."""
        c, pool = self.config, self.pool
        if pool.total() + size > c.memory_cap:
            return f"max_host_memory_bytes ({c.memory_cap})"
        return room_to_grow(pool.shm_dir, size)

    def expect(self, s: Session, sessions: dict[bytes, Session]) -> None:
        """``s``'s job resumes: the starting buffers grow ahead to its last snapshot's size (as its
        index records it), and more are added so that each client connected for such a job (the
        ranks of a node, ``sessions``) has one: its first snapshot finds a buffer ready, pinned on
        the GPU path. In the background: the trainer is restoring meanwhile, and four threads at
        full priority beside it made its restore 3-5 times slower on 2 cores."""
        c = self.config
        last = latest_raw_bytes(JobDir(s.jobs_root, s.job).path, s.rank, s.world_size)
        if last is not None and c.host_buffer_bytes < last <= c.buffer_cap:
            s.expects = size = grown_size(last, c.buffer_cap)
            cause = (f"for job {s.job}, whose last snapshot was {last >> 20} MiB" if s.world_size == 1 else
                     f"for rank {s.rank} of job {s.job}, its part of the last snapshot {last >> 20} MiB")
            self.grow_ahead(size, s.uid, cause, background=True)
            # (a larger buffer serves a smaller rank: rank 0's part may be the largest)
            wanted = sum(x.expects is not None and x.expects >= size and x.uid == s.uid
                         for x in sessions.values())
            self.add_ahead(size, s.uid, wanted, cause)

    def grow_ahead(self, size: int, uid: int, cause: str, background: bool = False) -> None:
        """Each free starting buffer smaller than ``size`` (none of whose successors is being made)
        gets a successor of ``size`` for ``uid``, as memory allows; ``background``: made at the
        lowest priority until a request waits for it."""
        c, pool = self.config, self.pool
        succeeded = {m.succeeds for m in self.making.values() if m.succeeds is not None}
        for b in list(pool.buffers):
            if b.lease is not None or b.mm is None or b.index >= c.host_buffers or b.size >= size or \
                    b.index in succeeded:
                continue
            why = self.no_room(size)
            if why:
                log.info("host buffer %d not grown ahead to %d MiB (%s): a snapshot that needs it waits "
                         "while it is made", b.index, size >> 20, why)
                continue
            log.info("host buffer %d grows ahead to %d MiB, %s", b.index, size >> 20, cause)
            self.start(pool.reserve(size), size, uid, None, ahead=True, succeeds=b.index,
                       background=background)

    def add_ahead(self, size: int, uid: int, wanted: int, cause: str) -> None:
        """Buffers for ``uid`` of ``size`` (ready, or made ahead of need) up to ``wanted``, more added
        in the background as memory allows: one for each rank of a job that resumes."""
        pool = self.pool
        have = sum(1 for b in pool.buffers if (b.mm is not None and pool.serves(b, uid, size)) or
                   ((m := self.making.get(b.index)) is not None and m.ahead and m.size >= size
                    and serves_uid(m.uid, uid)))
        for _ in range(wanted - have):
            why = self.no_room(size)
            if why:
                log.info("no host buffer of %d MiB added ahead (%s): a snapshot that needs it waits while "
                         "it is made", size >> 20, why)
                return
            slot = pool.reserve(size)
            log.info("host buffer %d of %d MiB added ahead, %s", slot.index, size >> 20, cause)
            self.start(slot, size, uid, None, ahead=True, background=True)

    def _succeed(self, new: HostBuffer, index: int) -> None:
        """``new``, made ahead of need, takes the place of buffer ``index`` if that one is free."""
        old = next((b for b in self.pool.buffers if b.index == index), None)
        if old is None or old.lease is not None or old.mm is None or new.lease is not None:
            return  # (one buffer more until the job ends)
        self.pool.drop(old, f"buffer {new.index}, grown ahead to {new.size >> 20} MiB, takes its place")
        new.index = index  # (a starting buffer again: it is the one that shrinks when the job ends)

    def restore_start(self) -> None:
        """No client left (a job ended): the buffers added go, and grown ones are made anew at the
        starting size, so that a service does not hold a finished job's memory."""
        c, pool = self.config, self.pool
        for b in sorted(pool.buffers, key=lambda b: -b.index):
            if b.lease is None and b.index >= c.host_buffers and len(pool.buffers) > c.host_buffers:
                pool.drop(b)
        for b in pool.buffers:
            if b.lease is None and b.size > c.host_buffer_bytes and b.index not in self._kept_grown:
                self.start(b, c.host_buffer_bytes, owner_uid(b.uid), None)
