"""When the server's loop ends: the drain a SIGTERM starts, and the exit of a daemon left idle.

A drain refuses new snapshots and buffer waits, but for emergency snapshots, then lasts until every
snapshot in flight is persisted, and (where the daemon has them) uploaded to the remote tier and
copied to the replica holders that answer, or until ``drain_timeout_s``: what was not done by then
is logged, one line per snapshot, part or upload. A store that does not answer is not waited for:
no use waiting it out.

The daemon is often stopped with the job it serves, by the same signal: a Slurm job's preemption
or end signals every step, the daemon's too where it runs inside the allocation, and a node's
shutdown stops services and jobs together. So the drain also waits, each up to its handler's
deadline, for the emergency snapshot of every connected trainer with a preemption handler
(``preempt``): until it asks for a buffer and sends its snapshot, is refused a regular one (it is
not being stopped: a restart with training going on), or goes away. A daemon that left at once
lost the trainers' last state: their emergency snapshots found no one. A client granted a buffer
is writing a snapshot into it: that one is waited for too.
"""

from __future__ import annotations

import logging
import time

from snapd.daemon.config import DaemonConfig
from snapd.daemon.intake import Intake
from snapd.daemon.leases import Leases
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.sessions import Session
from snapd.daemon.tasks import TaskTable

log = logging.getLogger(__name__)


class Shutdown:
    def __init__(self, config: DaemonConfig, tasks: TaskTable, sessions: dict[bytes, Session],
                 pipeline: Pipeline, intake: Intake, leases: Leases) -> None:
        self.config, self.tasks, self.sessions, self.pipeline = config, tasks, sessions, pipeline
        self.intake, self.leases = intake, leases
        self.stopping = False
        self.began = 0.0
        self.idle_since = time.monotonic()

    def begin(self) -> None:
        self.stopping = self.intake.stopping = True
        self.began = time.monotonic()
        log.info("stopping: no new snapshots but emergency ones; persisting %d in flight", len(self.tasks))
        self.leases.refuse_waiters()
        handlers = [s for s in self.owed(self.began) if s.preempt_s is not None]
        if handlers:
            log.info("waiting up to %.0f s for the emergency snapshots of %d client(s) with a preemption "
                     "handler: pid(s) %s", max(s.preempt_s or 0.0 for s in handlers), len(handlers),
                     ", ".join(str(s.pid) for s in handlers))
        writing = [s for s in self.sessions.values() if s.leases]
        if writing:
            log.info("waiting for the snapshots of %d client(s) writing into host buffers: pid(s) %s",
                     len(writing), ", ".join(str(s.pid) for s in writing))

    def owed(self, now: float) -> list[Session]:
        """The connected clients whose snapshot may still come: granted a buffer they are writing
        (a snapshot on its way, granted before the drain or an emergency one since); or with a
        preemption handler, within its deadline, not heard from since the drain began, or waiting
        for a buffer."""
        waiting = {w.peer for w in self.leases.waiters}
        return [s for s in self.sessions.values() if s.leases or (
            s.preempt_s is not None and now < self.began + s.preempt_s
            and (not s.heard_in_drain or s.peer in waiting))]

    def ended(self, past_deadline: bool) -> int | None:
        """The exit status once the drain is over: the emergency snapshots of the clients preempted
        with the daemon handed over, every snapshot persisted and (with a remote tier) uploaded, the
        emergency ones first, or the store not answering, or the deadline passed."""
        if not past_deadline and self.owed(time.monotonic()):
            return None
        uploads, peers = self.pipeline.uploads, self.pipeline.peers
        if not self.tasks and (uploads is None or uploads.idle()) and \
                (peers is None or peers.replication.settled()):  # (copies on other nodes: docs/peers.md)
            log.info("drained; exiting")
            return 0
        if not self.tasks and uploads is not None and uploads.unreachable():  # (no use waiting it out)
            for line in uploads.unfinished():
                log.error("the store does not answer: not in the remote tier: %s", line)
            return 0
        return self._timed_out() if past_deadline else None

    def _timed_out(self) -> int:
        if self.tasks:
            log.error("drain deadline passed with %d snapshot(s) unpersisted", len(self.tasks))
        uploads = self.pipeline.uploads
        for line in uploads.unfinished() if uploads is not None else []:
            log.error("drain deadline passed: not in the remote tier: %s", line)
        for line in self.pipeline.peers.replication.unfinished() if self.pipeline.peers is not None else []:
            log.error("drain deadline passed: not replicated: %s", line)
        return 1 if self.tasks else 0

    def idle_too_long(self, now: float) -> bool:
        """No client and no snapshot for ``exit_when_idle_s`` (a private daemon's end)."""
        if self.sessions or self.tasks:
            self.idle_since = now
            return False
        limit = self.config.exit_when_idle_s
        return limit is not None and now - self.idle_since > limit
