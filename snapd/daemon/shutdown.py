"""When the server's loop ends: the drain a SIGTERM starts, and the exit of a daemon left idle.

A drain refuses new snapshots and buffer waits, then lasts until every snapshot in flight is
persisted, and (where the daemon has them) uploaded to the remote tier and copied to the replica
holders that answer, or until ``drain_timeout_s``: what was not done by then is logged, one line per
snapshot, part or upload. A store that does not answer is not waited for: no use waiting it out.
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
        self.idle_since = time.monotonic()

    def begin(self) -> None:
        self.stopping = self.intake.stopping = True
        log.info("stopping: no new snapshots; persisting %d in flight", len(self.tasks))
        self.leases.refuse_waiters()

    def ended(self, past_deadline: bool) -> int | None:
        """The exit status once the drain is over: every snapshot persisted and (with a remote tier)
        uploaded, the emergency one first, or the store not answering, or the deadline passed."""
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
