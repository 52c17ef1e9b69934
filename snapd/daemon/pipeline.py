"""The daemon's stages after receive: copy -> encode and write -> seal, and the snapshot state machine.

Each snapshot is a ``Task`` (snapd.daemon.tasks). Its state changes here and nowhere else (the
seal thread's part of Pipeline is snapd.daemon.seal_stage):
``received`` (server thread), the copy thread's COPIED, ``copied`` (the GPU copier's copies are
in), the flush thread's ENCODED, the seal thread's PERSISTED (or PART_DURABLE: a rank's part,
which snapd.daemon.rank_commits then holds), and ``failed`` from any stage, which also makes the
"done" event the server answers the client with. Encoding runs on a shared pool (LZ4, zstd and
xxh3 release the GIL); the flush thread writes chunks in order with at most ``2 x threads + 2``
in flight, then hands the snapshot to the seal thread (fsync, manifest, commit) and writes the
next one while the disk finishes the last. Emergency snapshots jump both queues.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from snapd.daemon.buffer_reads import BufferReads, ScratchPool
from snapd.daemon.channels import Outbox, stage_loop
from snapd.daemon.codec_choice import Choice, CodecBook
from snapd.daemon.config import DaemonConfig
from snapd.daemon.regions import copy_from_region
from snapd.daemon.rank_commits import RankCommits
from snapd.daemon.seal_stage import SealStage, Sealing
from snapd.daemon.uploads import Uploader
from snapd.daemon.tasks import (COPIED, ENCODED, FAILED, PERSISTED, Task,
                                failure_fields, next_seq)
from snapd.errors import FlushError
from snapd.format import global_commit
from snapd.format.incremental import previous
from snapd.format.jobdir import JobDir
from snapd.format.rank_parts import roles
from snapd.format.saving import encode_and_write
from snapd.format.writer import SnapshotWriter

log = logging.getLogger(__name__)

class Pipeline(SealStage):
    """The copy thread, the encode pool and the flush thread, fed by the server thread.

    ``copy`` takes snapshots whose bytes are still in the client's registered
    region (copies them into the host buffer, then reports COPIED and queues
    them for flushing); ``submit`` takes snapshots already in the host buffer.
    """

    def __init__(self, config: DaemonConfig, ctx: zmq.Context) -> None:
        self.config = config
        self._ctx = ctx
        self._queue: queue.PriorityQueue[tuple[int, int, Task | None]] = queue.PriorityQueue()
        self._pool = ThreadPoolExecutor(config.encode_threads, thread_name_prefix="snapd-encode")
        self._scratch = ScratchPool(config.chunk_bytes)  # chunks copied out of host buffers (buffer_reads)
        self.codecs = CodecBook(config)
        self._thread = threading.Thread(target=stage_loop, name="snapd-flush", daemon=True,
                                        args=(ctx, "flush", lambda: self._queue.get()[2], self._flush,
                                              self._flush_failed))
        # a snapshot written goes to the seal thread (fsync, commit): the flush thread writes the
        # next one meanwhile (bench: two ranks' parts flushed one after the other waited for each fsync)
        # (emergency snapshots first here too: one written while others wait for their fsync)
        self._seals: queue.PriorityQueue[tuple[int, int, Sealing | None]] = queue.PriorityQueue()
        self._sealer = threading.Thread(target=stage_loop, name="snapd-seal", daemon=True,
                                        args=(ctx, "seal", lambda: self._seals.get()[2], self._seal,
                                              self._seal_failed))
        self._copies: queue.Queue[tuple[Task, list] | None] = queue.Queue()
        self._copier = threading.Thread(target=stage_loop, name="snapd-copy", daemon=True,
                                        args=(ctx, "copy", self._copies.get, self._copy_one,
                                              self._copy_failed))
        self.commits = RankCommits(ctx, config.commit_timeout_s, self._part_committed, self._commit_failed)
        # what retention took, removed after "persisted" is sent, off the seal thread (an emergency
        # snapshot must not wait behind the seconds a large snapshot's removal takes)
        self._trash = ThreadPoolExecutor(1, thread_name_prefix="snapd-trash")
        self.uploads = Uploader(config) if config.remote is not None else None  # (the remote tier)
        if self.uploads is not None:  # (nodes that share no filesystem: their parts meet in the bucket)
            self.commits.on_slow = self.uploads.add_part
        self.peers: Any = None  # snapd.daemon.peers.Peers with a peer_endpoint: the other nodes' daemons
        if config.peer_endpoint is not None:
            from snapd.daemon.peers import Peers

            self.peers = Peers(config, self._retention, ctx)
            self.commits.spread = self.peers.waiting

    def start(self) -> None:
        self._thread.start()
        self._sealer.start()
        self._copier.start()
        self.commits.start()
        if self.uploads is not None:
            self.uploads.start()
        if self.peers is not None:
            self.peers.start()
        self.codecs.start()

    # -- the state machine -------------------------------------------------------
    def received(self, task: Task, in_buffer: bool) -> None:
        """A snapshot accepted (server thread); ``in_buffer``: its bytes are there already (the
        plain path: the client copied them before sending it)."""
        if in_buffer:
            task.advance(COPIED)

    def copied(self, task: Task) -> None:
        """The GPU copier's copies of ``task`` are done (server thread): on to encoding."""
        task.advance(COPIED)
        self.submit(task)

    def failed(self, task: Task, stage: str, code: str, message: str, error: BaseException | None = None,
               **extra: Any) -> dict[str, Any]:
        """``task`` failed in ``stage`` (any stage's thread, or the server's): logged here, once (with
        the traceback of ``error`` when it is a bug of ours); the "done" event to send the server."""
        if task.state not in (FAILED, PERSISTED):
            task.advance(FAILED)
        log.error("snapshot %s step %d failed in %s: %s", task.job, task.step, stage, message,
                  exc_info=error if code == "internal" else None)
        return {"event": "done", "seq": task.seq, "ok": False, "code": code, "message": message,
                "stage": stage, **extra}

    # -- the copy stage (registered regions) -----------------------------------------
    def copy(self, task: Task, copies: list) -> None:
        """Copy ``[(dst, src), ...]`` from registered regions, then persist the task."""
        self._copies.put((task, copies))

    def _copy_one(self, item: tuple[Task, list], outbox: Outbox) -> None:
        task, copies = item
        for dst, src in copies:  # pread releases the GIL
            copy_from_region(dst, src)
        task.advance(COPIED)
        outbox.send({"event": "copied", "seq": task.seq})
        self.submit(task)

    def _copy_failed(self, item: tuple[Task, list], error: Exception, outbox: Outbox) -> None:
        # (a region that went away or was cut short under us)
        outbox.send(self.failed(item[0], "copy", *failure_fields(error, "copy"), error))

    def submit(self, task: Task) -> None:
        self._queue.put((0 if task.emergency else 1, task.seq, task))

    def stop(self) -> None:
        self._copies.put(None)
        self._queue.put((2, next_seq(), None))
        if self._thread.is_alive():  # (a daemon stopped before it started serving never started it)
            self._thread.join(timeout=5)
        self._seals.put((2, next_seq(), None))
        if self._sealer.is_alive():
            self._sealer.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._trash.shutdown(wait=True)  # (else left to the next start's sweep of leftovers)
        self.commits.stop()
        if self.uploads is not None:
            self.uploads.stop()
        if self.peers is not None:
            self.peers.stop()

    def gpu_shuffle(self, task: Task) -> str | None:
        """The shuffling codec the GPU copy should prepare chunks for, if the job's codec shuffles
        (known from its earlier snapshots or the config); sets it as the task's codec."""
        if task.emergency:
            return None
        codec = self.config.codec
        if codec == "auto":
            choice = self.codecs.get(task.key)
            codec = choice.codec if choice is not None else ""
        if codec.startswith("shuffle-"):
            task.codec = codec
            return codec
        return None

    def codec_choices(self) -> dict[str, Choice]:
        """A copy of the codec choices, per job directory (for ``snapd status``, any thread)."""
        return self.codecs.copy()

    # -- the flush thread --------------------------------------------------------------
    def _flush(self, task: Task, outbox: Outbox) -> None:
        """Encode and write ``task``, then hand it to the seal thread (or report its failure)."""
        stage = "flush"
        writer = None
        reads: BufferReads | None = None
        prev = None
        started = time.monotonic()
        try:
            jobdir = JobDir(task.root, task.job)
            jobdir.open_for_write()
            writer = SnapshotWriter(jobdir, task.step)
            writer.taken_unix_s = task.taken_unix_s
            stage = "encode"
            if task.buffer is not None:  # reads a client cannot make fault (snapd.daemon.buffer_reads)
                b = task.buffer
                reads = BufferReads(b.path, b.address, b.end, self._scratch, copy=b.foreign)
            codec = self.codecs.codec(task, reads)
            if self.config.incremental == "on":
                prev = previous(jobdir, task.rank, task.world_size)
            try:
                encode_and_write(writer, task.leaves, codec, self._pool, self.config.encode_threads,
                                 self.config.chunk_bytes, reads.chunk if reads is not None else None,
                                 self._roles(task), prev)
            except (OSError, FlushError):
                stage = "flush"
                raise
            task.advance(ENCODED)
        except Exception as e:  # every failure is reported to the client, naming the stage
            outbox.send(self._abandon(task, writer, stage, e))
            return
        finally:
            if reads is not None:
                reads.close()
            if prev is not None:
                prev.close()
        self._seals.put((0 if task.emergency else 1, task.seq, Sealing(task, writer, codec, started)))
        outbox.send({"event": "written"})  # (its buffer may go to an emergency one: snapd.daemon.waiting)

    def _flush_failed(self, task: Task, error: Exception, outbox: Outbox) -> None:
        outbox.send(self.failed(task, "flush", *failure_fields(error, "flush"), error))

    @staticmethod
    def _roles(task: Task) -> list | None:
        return roles(task.leaves, task.rank, task.world_size, task.per_rank) if task.world_size > 1 else None

    def _abandon(self, task: Task, writer: SnapshotWriter | None, stage: str, e: Exception) -> dict[str, Any]:
        """A snapshot that failed in ``stage``: its temporary files go, and the other ranks of its
        step are told at once rather than at their timeout; its "done" event."""
        if writer is not None:
            writer.abort()
        if task.world_size > 1 and stage != "commit":
            global_commit.fail_step(JobDir(task.root, task.job), task.step, task.world_size, task.run,
                                    f"rank {task.rank}'s part failed in {stage}: {e}")
        return self.failed(task, stage, *failure_fields(e, stage), e)
