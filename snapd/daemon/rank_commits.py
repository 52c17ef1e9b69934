"""Rank parts waiting for the rest of their global snapshot: one thread watches them.

A rank's part, once durable, is delivered into its step's pending directory (snapd.format.global_commit);
unless it was the last part, its snapshot is not done: the other ranks' parts come from this
daemon's other clients or from other nodes' daemons. This thread looks at the shared root every
``POLL_S`` for each waiting part: committed (by whichever writer brought the last part), failed (a
rank gave the step up, or the parts disagreed), or still waiting; a part that waited
``commit_timeout_s`` gives its step up, naming the ranks missing. Nothing here blocks a stage
thread or the training step, and no wait is unbounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from snapd.daemon.channels import Outbox
from snapd.daemon.tasks import Task
from snapd.format import global_commit, step_outcome
from snapd.format.step_outcome import Delivery

log = logging.getLogger(__name__)

POLL_S = 0.02
OFFER_AFTER_S = 2.0  # a part waiting this long goes to the remote tier's uploads (if there is one)
COUNT_EVERY_S = 1.0  # how often a waiting part's missing ranks are listed (``snapd status``)


@dataclass
class Waiting:
    task: Task
    delivery: Delivery
    since: float  # monotonic, when the part became durable
    codec: str
    stored_bytes: int  # this rank's part
    missing: list[int]
    counted: float = 0.0  # when the missing ranks were last listed (each look need not list them)
    # the remote tier: offered to the uploads once it waited OFFER_AFTER_S (nodes that share no
    # filesystem commit in the bucket); ``remote``: where it was committed there (the upload thread
    # sets it); ``ended``: this thread is done with it
    offered: bool = False
    remote: str | None = None
    ended: bool = False


class RankCommits:
    """``committed(waiting, path)`` and ``failed(task, message)`` make each ending's "done" event
    (snapd.daemon.pipeline owns the state machine); they run on this thread."""

    def __init__(self, ctx: zmq.Context, timeout_s: float, committed: Callable[[Waiting, str], dict],
                 failed: Callable[[Task, str], dict]) -> None:
        self._ctx, self.timeout_s = ctx, timeout_s
        self._committed, self._failed = committed, failed
        self._waiting: list[Waiting] = []
        self.on_slow: Callable[[Waiting], None] | None = None  # (snapd.daemon.uploads.Uploader.add_part)
        # commits a step from the parts other nodes announced (snapd.daemon.peer_commits.PartBook.try_commit)
        self.spread: Callable[[Waiting], None] | None = None
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="snapd-rank-commits", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def add(self, w: Waiting) -> None:
        with self._lock:
            self._waiting.append(w)
            self._lock.notify()

    def status(self) -> list[dict[str, Any]]:
        """The parts waiting, for ``snapd status`` (any thread)."""
        now = time.monotonic()
        with self._lock:
            return [{"job": w.task.job, "dir": w.task.key, "step": w.task.step, "rank": w.task.rank,
                     "world_size": w.task.world_size, "missing_ranks": w.missing,
                     "waited_s": round(now - w.since, 1), "timeout_s": self.timeout_s} for w in self._waiting]

    def _loop(self) -> None:
        outbox = Outbox(self._ctx)
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    if not self._waiting:
                        self._lock.wait()
                        continue
                    waiting = list(self._waiting)
                ended = [w for w in waiting if self._check(w, outbox)]
                with self._lock:
                    self._waiting = [w for w in self._waiting if w not in ended]
                for w in ended:
                    w.ended = True
                time.sleep(POLL_S)
        finally:
            outbox.close()

    def _check(self, w: Waiting, outbox: Outbox) -> bool:
        """Look at one waiting part; send its ending if it has one. Its own error boundary: a
        failure to look fails that snapshot, not the thread."""
        try:
            if w.remote is not None:  # committed in the bucket from every node's parts
                global_commit.leave(w.delivery)
                outbox.send(self._committed(w, w.remote))
                return True
            if self.spread is not None:  # (nodes that share no filesystem: their parts meet in the part book)
                self.spread(w)
            at = time.monotonic()
            count = at - w.counted >= COUNT_EVERY_S
            now = step_outcome.outcome(w.delivery, count)
            waited = at - w.since
            if now.state == "waiting" and not w.offered and self.on_slow is not None and \
                    waited >= OFFER_AFTER_S:
                w.offered = True
                self.on_slow(w)
            if now.state == "waiting" and waited >= self.timeout_s:
                now = global_commit.give_up(w.delivery, waited)
            if now.state == "committed":
                outbox.send(self._committed(w, now.detail))
                return True
            if now.state == "failed":
                outbox.send(self._failed(w.task, f"step {w.task.step} of job {w.task.job} was not committed: "
                                                 f"{now.detail}"))
                return True
            if count:
                w.missing, w.counted = now.missing, at
            return False
        except Exception as e:  # (the shared filesystem failing under us, say)
            log.exception("job %s step %d: watching the global commit failed", w.task.job, w.task.step)
            outbox.send(self._failed(w.task, f"watching the global commit of step {w.task.step} failed: "
                                             f"{type(e).__name__}: {e}"))
            return True
