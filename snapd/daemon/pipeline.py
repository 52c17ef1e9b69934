"""The daemon's stages after receive: copy -> encode -> flush.

Each snapshot is a ``Task`` whose state moves through the one state machine
below; the server thread creates tasks, the flush thread advances them and
reports each ending back to the server over an inproc socket (the server
stays the only owner of the ROUTER socket). Encoding runs on a shared pool
(LZ4, zstd and xxh3 release the GIL); the flush thread writes chunks in
order with at most ``2 x threads + 2`` in flight. Emergency snapshots jump
the queue.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from snapd.daemon.buffer_reads import BufferReads, ScratchPool
from snapd.daemon.codec_choice import SAMPLE_BYTES, Choice, choose, measure_disk
from snapd.daemon.config import DaemonConfig
from snapd.daemon.sessions import copy_from_region
from snapd.errors import FlushError, SnapdError
from snapd.format.jobdir import JobDir
from snapd.format.saving import encode_and_write
from snapd.format.tree import TensorLeaf
from snapd.format.writer import Retention, SnapshotWriter

log = logging.getLogger(__name__)

EVENTS_ENDPOINT = "inproc://snapd-pipeline-events"
SMALL_BYTES = 16 << 20  # a snapshot this small does not wait for the disk probe
ASSUMED_DISK_BPS = 500e6  # the disk's speed until it is measured

# The job state machine, in one place.
RECEIVED, COPIED, ENCODED, PERSISTED, FAILED = "RECEIVED", "COPIED", "ENCODED", "PERSISTED", "FAILED"
TRANSITIONS = {RECEIVED: {COPIED, FAILED}, COPIED: {ENCODED, FAILED}, ENCODED: {PERSISTED, FAILED},
               PERSISTED: set(), FAILED: set()}
_seq = itertools.count()


@dataclass
class Task:
    peer: bytes
    req_id: int
    job: str
    step: int
    metrics: dict[str, Any]
    emergency: bool
    tree: dict
    leaves: list[TensorLeaf]
    lease: int
    retention: Retention
    raw_bytes: int
    root: Path  # where this client's jobs live (the root, or the root's per-user directory)
    codec: str | None = None  # fixed before the copy when the GPU shuffled the chunks for it
    # the host buffer's file, the bytes the snapshot spans, its address here, and whether it serves
    # a uid other than the daemon's (snapd.daemon.buffer_reads)
    buffer: tuple[Path, int, int, bool] | None = None
    state: str = RECEIVED
    seq: int = field(default_factory=lambda: next(_seq))
    times: dict[str, float] = field(default_factory=lambda: {RECEIVED: time.monotonic()})
    taken_unix_s: float = field(default_factory=time.time)  # orders ``latest`` (snapd.format.index)

    @property
    def key(self) -> str:
        """The job's directory: two users' jobs of one name are two jobs (codec choice, status)."""
        return str(self.root / self.job)

    def advance(self, state: str) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"snapshot {self.job}@{self.step}: {self.state} -> {state} is not allowed")
        self.state = state
        self.times[state] = time.monotonic()


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
        self.choices: dict[str, Choice] = {}  # per job directory (a user's job, not every job of that name)
        self._thread = threading.Thread(target=self._run, name="snapd-flush", daemon=True)
        self._copies: queue.Queue[tuple[Task, list] | None] = queue.Queue()
        self._copier = threading.Thread(target=self._copy_loop, name="snapd-copy", daemon=True)
        self._probe = threading.Thread(target=self._probe_disk, name="snapd-disk-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._copier.start()
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

    def copy(self, task: Task, copies: list) -> None:
        """Copy ``[(dst, src), ...]`` from registered regions, then persist the task."""
        self._copies.put((task, copies))

    def _copy_loop(self) -> None:
        events = self._ctx.socket(zmq.PUSH)
        events.connect(EVENTS_ENDPOINT)
        try:
            while True:
                item = self._copies.get()
                if item is None:
                    return
                task, copies = item
                try:
                    for dst, src in copies:  # pread releases the GIL
                        copy_from_region(dst, src)
                except Exception as e:  # a region that went away or was cut short under us
                    task.advance(FAILED)
                    events.send(json.dumps({"event": "done", "seq": task.seq, "ok": False, "code": "copy",
                                            "message": str(e), "stage": "copy"}).encode())
                    continue
                task.advance(COPIED)
                events.send(json.dumps({"event": "copied", "seq": task.seq}).encode())
                self.submit(task)
        finally:
            events.close(linger=1000)

    def submit(self, task: Task) -> None:
        self._queue.put((0 if task.emergency else 1, task.seq, task))

    def stop(self) -> None:
        self._copies.put(None)
        self._queue.put((2, next(_seq), None))
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def gpu_shuffle(self, task: Task) -> str | None:
        """The shuffling codec the GPU copy should prepare chunks for, if the job's codec shuffles
        (known from its earlier snapshots or the config); sets it as the task's codec."""
        if task.emergency:
            return None
        codec = self.config.codec
        if codec == "auto":
            choice = self.choices.get(task.key)
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
        choice = self.choices.get(task.key)
        if choice is None:
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
        self.choices[task.key] = choice
        if task.codec is not None:  # the GPU already shuffled for it; the revised choice applies next time
            return task.codec
        return choice.revised(disk_bps, fastest_only=True).codec if task.emergency else choice.codec

    def _learn(self, task: Task, writer: SnapshotWriter, codec: str, stored: int, seconds: float) -> None:
        """Fold what this flush saw of the disk and of its codec into the next choice."""
        seen = writer.disk_bytes_per_s
        if seen is not None and self._disk_bps is not None:
            self._disk_bps = 0.5 * self._disk_bps + 0.5 * seen
        choice = self.choices.get(task.key)
        if choice is not None and not task.emergency:
            # waiting on I/O for under 70% of the flush: the encoder, not the disk, set the pace
            encode_bound = writer.io_seconds < 0.7 * seconds
            self.choices[task.key] = choice.learned(codec, task.raw_bytes, stored, seconds, encode_bound)

    def _run(self) -> None:
        events = self._ctx.socket(zmq.PUSH)
        events.connect(EVENTS_ENDPOINT)
        try:
            while True:
                _, _, task = self._queue.get()
                if task is None:
                    return
                events.send(json.dumps(self._persist(task)).encode())
        finally:
            events.close(linger=1000)

    def _persist(self, task: Task) -> dict[str, Any]:
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
                path, end, base, foreign = task.buffer
                reads = BufferReads(path, base, end, self._scratch, copy=foreign)
            codec = self._codec(task, reads)
            try:
                encode_and_write(writer, task.leaves, codec, self._pool, self.config.encode_threads,
                                 self.config.chunk_bytes, reads.chunk if reads is not None else None)
            except (OSError, FlushError):
                stage = "flush"
                raise
            task.advance(ENCODED)
            stage = "flush"
            done = writer.commit(tree=task.tree, metrics=task.metrics, codec=codec, retention=task.retention,
                                 emergency=task.emergency)
            task.advance(PERSISTED)
            if reads is not None:
                reads.close()
            self._learn(task, writer, codec, done.entry.stored_bytes, task.times[PERSISTED] - started)
            took = task.times[PERSISTED] - task.times[RECEIVED]
            log.info("persisted %s step %d: %d -> %d bytes, %s, %.2f s", task.job, task.step, task.raw_bytes,
                     done.entry.stored_bytes, codec, took)
            return {"event": "done", "seq": task.seq, "ok": True, "path": str(done.path), "codec": codec,
                    "stored_bytes": done.entry.stored_bytes, "seconds": took}
        except Exception as e:  # every failure is reported to the client, naming the stage
            if writer is not None:
                writer.abort()
            if reads is not None:
                reads.close()
            task.advance(FAILED)
            code = e.code if isinstance(e, SnapdError) else ("flush" if isinstance(e, OSError) else "internal")
            log.error("snapshot %s step %d failed in %s: %s", task.job, task.step, stage, e)
            return {"event": "done", "seq": task.seq, "ok": False, "code": code, "message": str(e), "stage": stage}
