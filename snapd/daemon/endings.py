"""What the server thread does with the stages' reports (over the events socket, snapd.daemon.channels).

- ``copied`` (the registered-region copy thread, or the GPU copier once the device copies are
  done): the buffer now holds the bytes; tell the client. From the GPU copier the snapshot then
  goes on to encoding (``Pipeline.copied``).
- ``queued`` (GPU copier): the copies are enqueued; the client gets the daemon's done events,
  so its stream can wait on them.
- ``done``: persisted or failed; the buffer goes back, the tallies move, and the client gets
  ``persisted`` or the error with its stage; ``sync`` requests waiting for it are answered.
- ``written`` (flush thread): a snapshot's bytes are written and wait for their fsync; its buffer
  is lent to an emergency snapshot waiting for one (snapd.daemon.waiting.lend_written).
- ``part``: a rank's part of a global snapshot is durable, and waits for the other ranks' parts
  (snapd.daemon.rank_commits): its buffer goes back now; its ``done`` comes with the commit.
- ``forgotten`` (GPU copier): a client's handles are closed; its ``bye`` is answered.
- ``buffer_ready`` (the host buffer pool's threads): a buffer made anew goes into the pool and to
  the request waiting for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from snapd import protocol
from snapd.daemon.channels import Replies
from snapd.daemon.leases import Leases
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.quotas import Quotas
from snapd.daemon.status import Tally
from snapd.daemon.tasks import TaskTable
from snapd.daemon.waiting import lend_written


@dataclass
class _Sync:
    peer: bytes
    req_id: int
    waits_for: set[int] = field(default_factory=set)  # the tasks still in flight


class Endings:
    def __init__(self, replies: Replies, tasks: TaskTable, leases: Leases, pipeline: Pipeline, quotas: Quotas,
                 tally: Tally) -> None:
        self.replies, self.tasks, self.leases, self.pipeline = replies, tasks, leases, pipeline
        self.quotas, self.tally = quotas, tally
        self._syncs: list[_Sync] = []

    def on_event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "done":
            self._finish(event)
        elif kind == "buffer_ready":  # a host buffer made on the pool's thread
            self.leases.replaced()
        elif kind == "written":  # (also posted by an emergency request that queued)
            lend_written(self.leases)
        elif kind == "forgotten":  # the GPU copier closed a leaving client's handles
            self.replies.send(bytes.fromhex(event["peer"]), protocol.message("bye", event["id"]))
        elif kind == "reply":  # a request answered off the server thread (snapd.daemon.peers, removals)
            if "quota_root" in event:  # (a user removed a snapshot: their quota counts what is left)
                self.quotas.refresh(Path(event["quota_root"]))
            self.replies.send(bytes.fromhex(event["peer"]), event["frame"].encode())
        elif (task := self.tasks.get(event["seq"])) is None:  # already failed and answered
            return
        elif kind == "queued":
            self.replies.send(task.peer, protocol.message("queued", task.req_id, step=task.step,
                                                          events=event["events"]))
        elif kind == "part":  # a rank's part is durable and waits for the others': its buffer goes back
            if task.lease > 0:  # (-1: lent to an emergency snapshot already)
                self.leases.free(None, task.lease)
            task.lease = -1
            self._synced(task.seq)  # (what it waits for is other ranks: a sync does not wait with it)
        elif kind == "copied":
            self.leases.copied(task.lease)
            if event.get("from_gpu"):
                self.pipeline.copied(task)
            self.replies.send(task.peer, protocol.message("copied", task.req_id, step=task.step))
        else:
            raise ValueError(f"unknown event {kind!r}")

    def sync(self, peer: bytes, job: str, root: Path, req_id: int) -> bytes | None:
        """``sync``: "synced" once every snapshot of ``job`` under ``root`` now in flight has ended,
        whichever client sent it (a trainer killed a moment ago, whose successor is about to restore:
        its last snapshots are still the daemon's to write). None: answered when they end. A rank's
        part already durable, waiting for the other ranks' parts, is not waited for: a restarted
        rank must not wait out the commit timeout of its previous run's step."""
        seqs = self.tasks.of_job(job, root, writing=True)
        if not seqs:
            return protocol.message("synced", req_id)
        self._syncs.append(_Sync(peer, req_id, seqs))
        return None

    def forget(self, peer: bytes) -> None:
        """The client left: its ``sync`` requests need no answer."""
        self._syncs = [x for x in self._syncs if x.peer != peer]

    def _synced(self, seq: int) -> None:
        """Task ``seq`` no longer holds up the syncs waiting for it."""
        for sync in list(self._syncs):
            sync.waits_for.discard(seq)
            if not sync.waits_for:
                self._syncs.remove(sync)
                self.replies.send(sync.peer, protocol.message("synced", sync.req_id))

    def _finish(self, event: dict) -> None:
        task = self.tasks.pop(event["seq"])
        if task is None:  # (a hand-over that failed ended it already)
            return
        self._synced(task.seq)
        if task.lease > 0:  # (-1: a rank's part gave it back once durable, or it was lent)
            self.leases.free(None, task.lease)
        self.quotas.refresh(task.root)  # (what retention deleted, what this snapshot added)
        if event["ok"]:
            self.tally.persisted(task, event["stored_bytes"], event["seconds"])
            reply = protocol.message("persisted", task.req_id, step=task.step, path=event["path"],
                                     codec=event["codec"], stored_bytes=event["stored_bytes"],
                                     raw_bytes=task.raw_bytes, seconds=event["seconds"])
        else:
            self.tally.failed(task, event["message"])
            # (the GPU copier's ipc_refused)
            extra = {k: event[k] for k in ("refused", "any_open") if k in event}
            reply = protocol.error_reply(task.req_id, event["code"], event["message"], event["stage"],
                                         **extra)
        self.replies.send(task.peer, reply)
