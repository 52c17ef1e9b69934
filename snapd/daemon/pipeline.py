"""The daemon's stages after receive: copy -> encode -> flush, and the snapshot state machine.

Each snapshot is a ``Task`` (snapd.daemon.tasks). Its state changes here and nowhere else:
``received`` (server thread), the copy thread's COPIED, ``copied`` (the GPU copier's copies are
in), the flush thread's ENCODED and PERSISTED, and ``failed`` from any stage, which also makes
the "done" event the server answers the client with. Encoding runs on a shared pool (LZ4, zstd
and xxh3 release the GIL); the flush thread writes chunks in order with at most
``2 x threads + 2`` in flight. Emergency snapshots jump the queue.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from snapd.daemon.buffer_reads import BufferReads, ScratchPool
from snapd.daemon.channels import Outbox, stage_loop
from snapd.daemon.codec_choice import SAMPLE_BYTES, Choice, choose, measure_disk
from snapd.daemon.config import DaemonConfig
from snapd.daemon.regions import copy_from_region
from snapd.daemon.rank_commits import RankCommits, Waiting
from snapd.daemon.uploads import Uploader
from snapd.daemon.tasks import (COPIED, ENCODED, FAILED, PART_DURABLE, PERSISTED, RECEIVED, Task,
                                failure_fields, next_seq)
from snapd.errors import FlushError
from snapd.format import global_commit
from snapd.format.jobdir import JobDir
from snapd.format.rank_parts import roles
from snapd.format.saving import encode_and_write
from snapd.format.writer import Retention, SnapshotWriter

log = logging.getLogger(__name__)

SMALL_BYTES = 16 << 20  # a snapshot this small does not wait for the disk probe
ASSUMED_DISK_BPS = 500e6  # the disk's speed until it is measured


class Pipeline:
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
        self._disk_bps: float | None = None
        self._scratch = ScratchPool(config.chunk_bytes)  # chunks copied out of host buffers (buffer_reads)
        # per job directory (a user's job, not every job of that name); the flush thread writes it,
        # ``snapd status`` reads a copy (codec_choices)
        self._choices: dict[str, Choice] = {}
        self._choices_lock = threading.Lock()
        self._thread = threading.Thread(target=stage_loop, name="snapd-flush", daemon=True,
                                        args=(ctx, "flush", lambda: self._queue.get()[2], self._flush,
                                              self._flush_failed))
        self._copies: queue.Queue[tuple[Task, list] | None] = queue.Queue()
        self._copier = threading.Thread(target=stage_loop, name="snapd-copy", daemon=True,
                                        args=(ctx, "copy", self._copies.get, self._copy_one,
                                              self._copy_failed))
        self._probe = threading.Thread(target=self._probe_disk, name="snapd-disk-probe", daemon=True)
        self.commits = RankCommits(ctx, config.commit_timeout_s, self._part_committed, self._commit_failed)
        self.uploads = Uploader(config) if config.remote is not None else None  # (the remote tier)
        if self.uploads is not None:  # (nodes that share no filesystem: their parts meet in the bucket)
            self.commits.on_slow = self.uploads.add_part

    def start(self) -> None:
        self._thread.start()
        self._copier.start()
        self.commits.start()
        if self.uploads is not None:
            self.uploads.start()
        if self.config.codec == "auto":
            self._probe.start()

    def _probe_disk(self) -> None:
        """The disk's durable write speed, measured once at start (at the lowest CPU priority):
        a first flush that measured it itself kept a burst of small snapshots waiting for it."""
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # (this thread only)
        try:
            bps = measure_disk(self.config.root)
        except OSError as e:
            log.warning("disk probe under %s failed (%s): assuming %.0f MB/s", self.config.root, e,
                        ASSUMED_DISK_BPS / 1e6)
            bps = ASSUMED_DISK_BPS
        if self._disk_bps is None:
            self._disk_bps = bps
        log.info("disk: %.0f MB/s durable writes under %s (first probe)", bps / 1e6, self.config.root)

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
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.commits.stop()
        if self.uploads is not None:
            self.uploads.stop()

    def gpu_shuffle(self, task: Task) -> str | None:
        """The shuffling codec the GPU copy should prepare chunks for, if the job's codec shuffles
        (known from its earlier snapshots or the config); sets it as the task's codec."""
        if task.emergency:
            return None
        codec = self.config.codec
        if codec == "auto":
            choice = self._choices.get(task.key)
            codec = choice.codec if choice is not None else ""
        if codec.startswith("shuffle-"):
            task.codec = codec
            return codec
        return None

    def _codec(self, task: Task, reads: BufferReads | None) -> str:
        if self.config.codec != "auto":
            return self.config.codec
        if self._disk_bps is None and task.raw_bytes >= SMALL_BYTES and not task.emergency:
            self._probe.join()
        # a small or emergency snapshot before the probe ends does not wait for it: it is coded
        # against an assumed disk, and the choice is revised against the measured one next time
        disk_bps = self._disk_bps or ASSUMED_DISK_BPS
        choice = self._choices.get(task.key)
        if choice is None or not choice.rates:  # (none yet, or made of a snapshot without tensor bytes)
            leaves = task.leaves
            if reads is not None and leaves:  # the sample, copied out of the buffer file
                big = max(leaves, key=lambda leaf: leaf.nbytes)
                leaves = [reads.sample(big, min(big.nbytes, SAMPLE_BYTES))]
            choice = choose(leaves, disk_bps, self.config.encode_threads)
            log.info("job %s: codec %s (%s)", task.job, choice.codec, choice.reason)
        else:
            revised = choice.revised(disk_bps)
            if revised.codec != choice.codec:
                log.info("job %s: codec %s -> %s (%s)", task.job, choice.codec, revised.codec, revised.reason)
            choice = revised
        self._choose(task.key, choice)
        if task.codec is not None:  # the GPU already shuffled for it; the revised choice applies next time
            return task.codec
        return choice.revised(disk_bps, fastest_only=True).codec if task.emergency else choice.codec

    def _learn(self, task: Task, writer: SnapshotWriter, codec: str, stored: int, seconds: float) -> None:
        """Fold what this flush saw of the disk and of its codec into the next choice."""
        seen = writer.disk_bytes_per_s
        if seen is not None and self._disk_bps is not None:
            self._disk_bps = 0.5 * self._disk_bps + 0.5 * seen
        choice = self._choices.get(task.key)
        if choice is not None and not task.emergency:
            # waiting on I/O for under 70% of the flush: the encoder, not the disk, set the pace
            encode_bound = writer.io_seconds < 0.7 * seconds
            self._choose(task.key, choice.learned(codec, task.raw_bytes, stored, seconds, encode_bound))

    def codec_choices(self) -> dict[str, Choice]:
        """A copy of the codec choices, per job directory (for ``snapd status``, any thread)."""
        with self._choices_lock:
            return dict(self._choices)

    def _choose(self, key: str, choice: Choice) -> None:
        with self._choices_lock:
            self._choices[key] = choice

    # -- the flush thread --------------------------------------------------------------
    def _flush(self, task: Task, outbox: Outbox) -> None:
        outbox.send(self._persist(task))

    def _flush_failed(self, task: Task, error: Exception, outbox: Outbox) -> None:
        outbox.send(self.failed(task, "flush", *failure_fields(error, "flush"), error))

    def _persist(self, task: Task) -> dict[str, Any]:
        """Encode and write ``task``; its "done" event."""
        stage = "flush"
        writer = None
        reads: BufferReads | None = None
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
            codec = self._codec(task, reads)
            parts = roles(task.leaves, task.rank, task.world_size, task.per_rank) if task.world_size > 1 \
                else None
            try:
                encode_and_write(writer, task.leaves, codec, self._pool, self.config.encode_threads,
                                 self.config.chunk_bytes, reads.chunk if reads is not None else None, parts)
            except (OSError, FlushError):
                stage = "flush"
                raise
            task.advance(ENCODED)
            stage = "flush"
            if parts is not None:
                stage = "commit"
                event = self._deliver(task, writer, codec, started)
            else:
                done = writer.commit(tree=task.tree, metrics=task.metrics, codec=codec,
                                     retention=self._retention(task), emergency=task.emergency)
                task.advance(PERSISTED)
        except Exception as e:  # every failure is reported to the client, naming the stage
            if writer is not None:
                writer.abort()
            if reads is not None:
                reads.close()
            if task.world_size > 1 and stage != "commit":  # the other ranks need not wait for the timeout
                global_commit.fail_step(JobDir(task.root, task.job), task.step, task.world_size, task.run,
                                        f"rank {task.rank}'s part failed in {stage}: {e}")
            return self.failed(task, stage, *failure_fields(e, stage), e)
        if reads is not None:
            reads.close()
        if parts is not None:
            return event
        try:
            self._learn(task, writer, codec, done.entry.stored_bytes, task.times[PERSISTED] - started)
        except Exception:  # (the snapshot is persisted: only the next codec choice misses this one)
            log.exception("job %s: learning from the flush of step %d failed", task.job, task.step)
        return self._persisted(task, str(done.path), codec, done.entry.stored_bytes)

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
        delivery = global_commit.deliver(writer.job, writer.tmp, sealed, self._retention(task))
        if delivery.committed is None:
            task.advance(PART_DURABLE)
            log.info("%s step %d: rank %d's part is durable; waiting for rank(s) %s", task.job, task.step,
                     task.rank, delivery.missing)
            self.commits.add(Waiting(task, delivery, time.monotonic(), codec, sealed.stored_bytes,
                                     delivery.missing))
            return {"event": "part", "seq": task.seq}
        task.advance(PERSISTED)
        self._learn(task, writer, codec, sealed.stored_bytes, task.times[PERSISTED] - started)
        return self._persisted(task, str(delivery.committed.path), codec, sealed.stored_bytes)

    def _part_committed(self, w: Waiting, path: str) -> dict[str, Any]:
        w.task.advance(PERSISTED)
        return self._persisted(w.task, path, w.codec, w.stored_bytes)

    def _commit_failed(self, task: Task, message: str) -> dict[str, Any]:
        return self.failed(task, "commit", "commit_failed", message)
