"""Which codec keeps the disk saturated.

The disk's durable write speed is measured once (a write + fsync in the
snapshot root); each job's first snapshot has each codec encode a sample of
its largest tensor. A codec moves ``min(encode speed x threads, disk speed x
ratio)`` raw bytes per second to disk; the fastest wins, and among codecs
within 5% of it the one that stores fewest bytes (lz4 where compression
would be the bottleneck, zstd where the disk is).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snapd.format import codecs, dtypes
from snapd.format.manifest import CODECS
from snapd.format.tree import TensorLeaf

log = logging.getLogger(__name__)

PROBE_BYTES = 32 << 20
SAMPLE_BYTES = 8 << 20


@dataclass(frozen=True)
class Choice:
    codec: str
    reason: str
    rates: dict[str, tuple[float, float]]  # codec -> (ratio, raw bytes/s to disk)


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


def choose(leaves: list[TensorLeaf], disk_bps: float, threads: int, *, fastest_only: bool = False) -> Choice:
    """Pick the codec for this data (``fastest_only`` for emergency dumps)."""
    if not leaves or max(leaf.data.nbytes for leaf in leaves) == 0:
        return Choice("raw", "no tensor bytes", {})
    big = max(leaves, key=lambda leaf: leaf.data.nbytes)
    size = dtypes.itemsize(big.dtype)
    n = min(big.data.nbytes, SAMPLE_BYTES)
    sample = big.data[: n - n % size]
    rates: dict[str, tuple[float, float]] = {"raw": (1.0, disk_bps)}
    for codec in CODECS[1:]:
        t = time.perf_counter()
        stored = 0
        for a in range(0, sample.nbytes, 4 << 20):
            stored += codecs.encode(sample[a:a + (4 << 20)], size, codec).stored
        speed = sample.nbytes / max(time.perf_counter() - t, 1e-9) * threads
        ratio = sample.nbytes / max(stored, 1)
        rates[codec] = (ratio, min(speed, disk_bps * ratio))
    best = max(rates.values(), key=lambda r: r[1])[1]
    near = [c for c, r in rates.items() if r[1] >= (1.0 if fastest_only else 0.95) * best]
    codec = max(near, key=lambda c: (rates[c][0], -CODECS.index(c)))
    ratio, rate = rates[codec]
    reason = (f"{rate / 1e6:.0f} MB/s to disk at ratio {ratio:.3f} (disk {disk_bps / 1e6:.0f} MB/s, "
              f"{threads} encode threads, sampled {big.key})")
    return Choice(codec, reason, rates)
