"""How long a snapshot may wait for a host buffer, and who hears of it.

A request that finds no buffer it may have queues as a ``Waiter`` (snapd.daemon.leases grants
them). No wait is unbounded: past 5 s it is logged once, naming the clients that hold buffers;
past ``busy_wait_s`` it is refused as busy with the same names, so the trainer skips that
snapshot and says why instead of hanging behind a client that hoards buffers.

An emergency snapshot (a preempted trainer, its scheduler's kill seconds away) does not wait for
another snapshot's fsync: the buffer of a snapshot already written, whose bytes are in the page
cache and wait only for their fsync and commit, is lent to it at once (``lend_written``). On a
slow disk, with every buffer held and memory at its cap, the emergency snapshot otherwise waited
for the fsyncs before it, past its handler's deadline, and the trainer's last state was lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from snapd import protocol
from snapd.daemon.tasks import ENCODED, PART_DURABLE, PERSISTED
from snapd.errors import Busy

log = logging.getLogger(__name__)

REPORT_AFTER_S = 5.0


@dataclass
class Waiter:
    peer: bytes
    req_id: int
    nbytes: int  # the buffer it needs (a smaller free one is grown for it)
    emergency: bool
    since: float
    # a snapshot that came without a lease (docs/PROTOCOL.md): run with the lease once granted,
    # it returns the reply and the hand-over to run after it; None for an ``acquire``
    then: Callable[[int, float], tuple[bytes, Callable[[], None] | None]] | None = None
    reported: bool = False  # its long wait was logged


def notify(leases: Any, s: Any, w: Waiter, why: str) -> None:
    """Tell a client that asked for notices (``hello.notices``) that its request waits, why, and
    for how long at most; older clients are told nothing until the grant or the refusal."""
    if s.notices:
        leases.replies.send(w.peer,
                            protocol.message("waiting", w.req_id, why=why,
                                             at_most_s=leases.config.busy_wait_s))


def expire(leases: Any, now: float) -> None:
    """Log long waits once; refuse those past ``busy_wait_s`` (not one whose own buffer is being
    made: that ends by itself)."""
    preparing = leases.maker.waited_for()
    for w in list(leases.waiters):
        waited = now - w.since
        if waited > REPORT_AFTER_S and not w.reported:
            w.reported = True
            log.warning("a snapshot of client %s has waited %.0f s for a host buffer; held: %s",
                        who(leases, w.peer), waited, holders(leases))
        if waited > leases.config.busy_wait_s and id(w) not in preparing:
            leases.waiters.remove(w)
            log.warning("refused a snapshot of client %s after %.0f s waiting for a host buffer "
                        "(busy_wait_s); held: %s", who(leases, w.peer), waited, holders(leases))
            leases.replies.send(w.peer, protocol.error_reply(w.req_id, Busy.code, (
                "no host buffer came free for this snapshot within busy_wait_s "
                f"({leases.config.busy_wait_s:.0f} s); held: {holders(leases)}")))


# a snapshot in these states no longer reads its host buffer: its bytes are written (page cache)
WRITTEN = (ENCODED, PART_DURABLE, PERSISTED)


def lend_written(leases: Any) -> None:
    """While the first request to get a buffer is an emergency snapshot's, give it the buffer of a
    snapshot already written (the oldest first: the one whose fsync ends first): that snapshot goes
    on to its fsync and commit without it, and its "done" frees nothing. Server thread only."""
    while (w := leases.eligible_waiter()) is not None and w.emergency:
        task = min((t for t in leases.tasks if t.lease > 0 and t.state in WRITTEN),
                   key=lambda t: t.seq, default=None)
        if task is None:
            return
        lease, task.lease = task.lease, -1
        log.info("lent the host buffer of %s step %d (written, waiting for its fsync) to the emergency "
                 "snapshot of client %s", task.job, task.step, who(leases, w.peer))
        leases.free(None, lease)


def who(leases: Any, peer: bytes) -> str:
    s = leases.sessions.get(peer)
    return f"pid {s.pid} (uid {s.uid}, job {s.job})" if s is not None else "gone"


def holders(leases: Any) -> str:
    held = {s.peer: leases.limits.held(s) for s in leases.sessions.values()}
    return ", ".join(f"{who(leases, p)}: {n}" for p, n in held.items() if n) or "none (buffers being made)"
