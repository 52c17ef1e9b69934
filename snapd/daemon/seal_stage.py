"""The seal thread's stage: a written snapshot made durable and committed (fsync, manifest, rename,
retention), or a rank's part sealed and delivered to its global snapshot (snapd.format.global_commit,
then snapd.daemon.rank_commits until the step ends); what each ending reports, and what the codec
choice learns from it.

A part of Pipeline of its own (snapd.daemon.pipeline, which runs the thread): the flush thread
hands it each snapshot it has written (``Sealing``), emergency snapshots first.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

from snapd.daemon.channels import Outbox
from snapd.daemon.codec_choice import CodecBook
from snapd.daemon.config import DaemonConfig
from snapd.daemon.rank_commits import RankCommits, Waiting
from snapd.daemon.tasks import PART_DURABLE, PERSISTED, RECEIVED, Task, failure_fields
from snapd.daemon.uploads import Uploader
from snapd.errors import SnapdError
from snapd.format import global_commit
from snapd.format.jobdir import JobDir
from snapd.format.writer import Retention, SnapshotWriter

log = logging.getLogger(__name__)


@dataclass
class Sealing:
    """A snapshot written (ENCODED), on its way from the flush thread to the seal thread."""

    task: Task
    writer: SnapshotWriter
    codec: str
    started: float  # monotonic, when its flush began


class SealStage:
    """The seal thread's work (Pipeline's; the attributes below are the pipeline's)."""

    config: DaemonConfig
    codecs: CodecBook
    commits: RankCommits
    uploads: Uploader | None
    peers: Any
    _trash: ThreadPoolExecutor

    failed: Callable[..., dict[str, Any]]  # (the state machine's: a task failed in a stage)
    _abandon: Callable[[Task, SnapshotWriter | None, str, Exception], dict[str, Any]]

    # -- the seal thread ---------------------------------------------------------------
    def _seal(self, item: Sealing, outbox: Outbox) -> None:
        """Make a written snapshot durable and commit it (a rank's part: deliver it)."""
        task, writer, codec = item.task, item.writer, item.codec
        stage = "flush"
        try:
            if task.world_size > 1:
                stage = "commit"
                outbox.send(self._deliver(task, writer, codec, item.started))
                return
            done = writer.commit(tree=task.tree, metrics=task.metrics, codec=codec,
                                 retention=self._retention(task), emergency=task.emergency,
                                 defer_removal=True)
            task.advance(PERSISTED)
        except Exception as e:
            outbox.send(self._abandon(task, writer, stage, e))
            return
        self._learn(task, writer, codec, done.entry.stored_bytes, task.times[PERSISTED] - item.started)
        if writer.shared_bytes:
            log.info("%s step %d: %d bytes shared with the previous snapshot, %d written", task.job,
                     task.step, writer.shared_bytes, writer.written_bytes)
        outbox.send(self._persisted(task, str(done.path), codec, done.entry.stored_bytes))
        self._remove(done.trash)
        if self.peers is not None and not str(done.path).startswith("s3://"):  # (copies on other nodes)
            try:
                self.peers.committed_whole(task, Path(done.path))
            except (OSError, SnapdError) as e:  # (replication lags; the snapshot is committed)
                log.warning("%s step %d: not offered to the peers: %s", task.job, task.step, e)

    def _remove(self, trash: list[Path]) -> None:
        if trash:
            self._trash.submit(JobDir.remove, trash)

    def _seal_failed(self, item: Sealing, error: Exception, outbox: Outbox) -> None:
        outbox.send(self.failed(item.task, "flush", *failure_fields(error, "flush"), error))

    def _learn(self, task: Task, writer: SnapshotWriter, codec: str, stored: int, seconds: float) -> None:
        try:
            self.codecs.learn(task, writer, codec, stored, seconds)
        except Exception:  # (the snapshot is persisted: only the next codec choice misses this one)
            log.exception("job %s: learning from the flush of step %d failed", task.job, task.step)

    def _retention(self, task: Task) -> Retention:
        """The job's retention, leaving what still waits for its upload."""
        if self.uploads is None:
            return task.retention
        return replace(task.retention, hold=self.uploads.held(task.root / task.job, task.raw_bytes))

    def _persisted(self, task: Task, path: str, codec: str, stored_bytes: int) -> dict[str, Any]:
        took = task.times[PERSISTED] - task.times[RECEIVED]
        if self.uploads is not None and not path.startswith("s3://"):  # (else: committed in the bucket)
            self.uploads.add(task.root, task.job, Path(path), task.step, task.emergency, stored_bytes,
                             task.retention, task.rank if task.world_size > 1 else None)
        log.info("persisted %s step %d: %d -> %d bytes, %s, %.2f s", task.job, task.step, task.raw_bytes,
                 stored_bytes, codec, took)
        return {"event": "done", "seq": task.seq, "ok": True, "path": path, "codec": codec,
                "stored_bytes": stored_bytes, "seconds": took}

    # -- a rank's part of a global snapshot (snapd.format.global_commit) -------------------
    def _deliver(self, task: Task, writer: SnapshotWriter, codec: str, started: float) -> dict[str, Any]:
        """Seal a rank's part and deliver it: the snapshot is done if it was the last part, else it
        waits (snapd.daemon.rank_commits) and its host buffer goes back now ("part")."""
        part = {"rank": task.rank, "world_size": task.world_size, "run": task.run}
        sealed = writer.seal(tree=task.tree, metrics=task.metrics, codec=codec, best=task.retention.best,
                             emergency=task.emergency, part=part)
        delivery = global_commit.deliver(writer.job, writer.tmp, sealed, self._retention(task),
                                         defer_removal=True)
        if self.peers is not None:  # (announced and replicated, whether its step waits or is committed)
            try:
                self.peers.delivered(task, delivery)
            except (OSError, SnapdError) as e:  # (replication lags; the snapshot does not fail for it)
                log.warning("%s step %d: rank %d's part not offered to the peers: %s", task.job, task.step,
                            task.rank, e)
        if delivery.committed is None:
            task.advance(PART_DURABLE)
            log.info("%s step %d: rank %d's part is durable; waiting for rank(s) %s", task.job, task.step,
                     task.rank, delivery.missing)
            self.commits.add(Waiting(task, delivery, time.monotonic(), codec, sealed.stored_bytes,
                                     delivery.missing))
            return {"event": "part", "seq": task.seq}
        task.advance(PERSISTED)
        self._learn(task, writer, codec, sealed.stored_bytes, task.times[PERSISTED] - started)
        done = self._persisted(task, str(delivery.committed.path), codec, sealed.stored_bytes)
        self._remove(delivery.committed.trash)  # (submitted first, run after: it waits for a thread)
        return done

    def _part_committed(self, w: Waiting, path: str) -> dict[str, Any]:
        w.task.advance(PERSISTED)
        return self._persisted(w.task, path, w.codec, w.stored_bytes)

    def _commit_failed(self, task: Task, message: str) -> dict[str, Any]:
        return self.failed(task, "commit", "commit_failed", message)
