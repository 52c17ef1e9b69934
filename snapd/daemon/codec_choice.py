"""Which codec keeps the disk saturated.

The disk's durable write speed is measured once; each job's first snapshot has each codec encode a
sample of its largest tensor, and the codec that moves the most raw bytes per second to disk wins
(among near ties, the one that stores fewest). The sample is optimistic, so every flush corrects it
with what its codec really achieved. The figures behind this: docs/design.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from snapd.format import codecs, dtypes
from snapd.format.chunks import CODECS
from snapd.format.leaves import TensorLeaf

if TYPE_CHECKING:
    from snapd.daemon.buffer_reads import BufferReads
    from snapd.daemon.config import DaemonConfig
    from snapd.daemon.tasks import Task
    from snapd.format.writer import SnapshotWriter

log = logging.getLogger(__name__)

PROBE_BYTES = 128 << 20  # (smaller probes measure fsync latency, not the disk: docs/design.md)
SAMPLE_BYTES = 8 << 20
MIN_LEARN_BYTES = 64 << 20


@dataclass(frozen=True)
class Choice:
    codec: str
    reason: str
    rates: dict[str, tuple[float, float]]  # codec -> (ratio, encode bytes/s on the usable cores)
    key: str = ""
    observed: frozenset[str] = frozenset()  # codecs whose speed comes from real flushes

    def revised(self, disk_bps: float, fastest_only: bool = False) -> Choice:
        """The same measurements judged against a new disk speed (none: nothing to judge)."""
        if not self.rates:
            return self
        return _pick(self.rates, disk_bps, self.key, fastest_only, self.observed)

    def learned(self, codec: str, raw_bytes: int, stored_bytes: int, seconds: float,
                encode_bound: bool = False) -> Choice:
        """Fold one flush of ``raw_bytes`` (stored as ``stored_bytes`` in ``seconds``, from
        encode start to durable) into the estimate for ``codec``. Small flushes are ignored:
        fsync and rename latency would pass for a slow codec. When the flush waited on encoding
        rather than on the disk, the other codecs' samples were as optimistic as this one's:
        they are scaled by the same factor."""
        if raw_bytes < MIN_LEARN_BYTES or stored_bytes <= 0 or seconds <= 0 or codec not in self.rates:
            return self
        seen = raw_bytes / seconds
        ratio, speed = self.rates[codec]
        rates = dict(self.rates)
        if codec in self.observed and speed != float("inf"):
            seen = 0.5 * speed + 0.5 * seen
        elif encode_bound and speed != float("inf") and seen < speed:
            for other, (r, s) in self.rates.items():
                if other not in self.observed and s != float("inf"):
                    rates[other] = (r, s * seen / speed)
        rates[codec] = (raw_bytes / stored_bytes if codec != "raw" else 1.0, seen)
        return Choice(self.codec, self.reason, rates, self.key, self.observed | {codec})


def measure_disk(root: Path, nbytes: int = PROBE_BYTES) -> float:
    """Durable write bandwidth of ``root`` in bytes/s (buffered write + one fsync)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".snapd-disk-probe-{os.getpid()}"
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    t = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return nbytes / max(time.perf_counter() - t, 1e-6)


def encode_cores(threads: int) -> float:
    """Cores encoding can really use: the flush thread (and on a small node the
    trainer) needs one (docs/design.md)."""
    return max(1.0, min(threads, os.cpu_count() or 1) - 1.0)


def choose(leaves: list[TensorLeaf], disk_bps: float, threads: int, *, fastest_only: bool = False) -> Choice:
    """Pick the codec for this data (``fastest_only`` for emergency dumps)."""
    if not leaves or max(leaf.nbytes for leaf in leaves) == 0:
        return Choice("raw", "no tensor bytes", {})
    big = max(leaves, key=lambda leaf: leaf.nbytes)
    size = dtypes.itemsize(big.dtype)
    n = min(big.nbytes, SAMPLE_BYTES)
    sample = big.data[: n - n % size]
    rates: dict[str, tuple[float, float]] = {"raw": (1.0, float("inf"))}
    for codec in CODECS[1:]:
        t = time.perf_counter()
        stored = 0
        for a in range(0, sample.nbytes, 4 << 20):
            stored += codecs.encode(sample[a:a + (4 << 20)], size, codec).stored
        speed = sample.nbytes / max(time.perf_counter() - t, 1e-9) * encode_cores(threads)
        rates[codec] = (sample.nbytes / max(stored, 1), speed)
    return _pick(rates, disk_bps, big.key, fastest_only)


def _pick(rates: dict[str, tuple[float, float]], disk_bps: float, key: str, fastest_only: bool,
          observed: frozenset[str] = frozenset()) -> Choice:
    to_disk = {c: min(speed, disk_bps * ratio) for c, (ratio, speed) in rates.items()}
    best = max(to_disk.values())
    near = [c for c in rates if to_disk[c] >= (1.0 if fastest_only else 0.95) * best]
    top_ratio = max(rates[c][0] for c in near)
    # within 2% of the best ratio, the cheapest codec (CODECS is in order of cost) wins
    codec = next(c for c in CODECS if c in near and rates[c][0] >= 0.98 * top_ratio)
    how = ("measured in flushes" if codec in observed else "no encoding" if codec == "raw"
           else f"sampled {key}")
    reason = (f"{to_disk[codec] / 1e6:.0f} MB/s to disk at ratio {rates[codec][0]:.3f} "
              f"(disk {disk_bps / 1e6:.0f} MB/s, {how})")
    return Choice(codec, reason, rates, key, observed)


SMALL_BYTES = 16 << 20  # a snapshot this small does not wait for the disk probe
ASSUMED_DISK_BPS = 500e6  # the disk's speed until it is measured


class CodecBook:
    """Each job directory's codec choice and the disk's speed: the flush thread asks (``codec``),
    the seal thread folds each flush in (``learn``), ``snapd status`` reads a copy; under a lock."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._disk_bps: float | None = None
        self._choices: dict[str, Choice] = {}  # per job directory (a user's job, not every job of that name)
        self._lock = threading.Lock()
        self._probe = threading.Thread(target=self._probe_disk, name="snapd-disk-probe", daemon=True)

    def start(self) -> None:
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
        with self._lock:
            if self._disk_bps is None:
                self._disk_bps = bps
        log.info("disk: %.0f MB/s durable writes under %s (first probe)", bps / 1e6, self.config.root)

    def copy(self) -> dict[str, Choice]:
        with self._lock:
            return dict(self._choices)

    def get(self, key: str) -> Choice | None:
        with self._lock:
            return self._choices.get(key)

    def put(self, key: str, choice: Choice) -> None:
        with self._lock:
            self._choices[key] = choice

    def codec(self, task: Task, reads: BufferReads | None) -> str:
        """The codec to flush ``task`` with (the flush thread)."""
        if self.config.codec != "auto":
            return self.config.codec
        if self._disk_bps is None and task.raw_bytes >= SMALL_BYTES and not task.emergency:
            self._probe.join()
        # a small or emergency snapshot before the probe ends does not wait for it: it is coded
        # against an assumed disk, and the choice is revised against the measured one next time
        disk_bps = self._disk_bps or ASSUMED_DISK_BPS
        choice = self.get(task.key)
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
        self.put(task.key, choice)
        if task.codec is not None:  # the GPU already shuffled for it; the revised choice applies next time
            return task.codec
        return choice.revised(disk_bps, fastest_only=True).codec if task.emergency else choice.codec

    def learn(self, task: Task, writer: SnapshotWriter, codec: str, stored: int, seconds: float) -> None:
        """Fold what a flush saw of the disk and of its codec into the next choice (the seal thread)."""
        seen = writer.disk_bytes_per_s
        with self._lock:
            if seen is not None and self._disk_bps is not None:
                self._disk_bps = 0.5 * self._disk_bps + 0.5 * seen
            choice = self._choices.get(task.key)
            # (a flush that shared chunks with the previous snapshot wrote less than its raw bytes:
            # its time says nothing of the codec's speed)
            if choice is not None and not task.emergency and not writer.shared_bytes:
                # waiting on I/O for under 70% of the flush: the encoder, not the disk, set the pace
                encode_bound = writer.io_seconds < 0.7 * seconds
                self._choices[task.key] = choice.learned(codec, task.raw_bytes, stored, seconds, encode_bound)
