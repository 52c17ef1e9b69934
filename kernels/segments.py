"""Segment tables and launch geometry for the segment kernel (``segments.cu``), without CuPy.

A segment is ``(src, dst, m, k, mode)`` over device addresses (see the kernel's
header for the modes). This module turns a list of them into launches: the
``uint64`` table the kernel reads and its grid. ``cupy_backend`` runs those on
a stream; the host emulator in the tests runs the very same launches over host
memory, so the launch arithmetic and the kernel are checked on every CI run.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

from snapd.kernels.numpy_shuffle import chunk_step

COPY, SHUFFLE, UNSHUFFLE = 0, 1, 2
THREADS = 256          # threads per block (SNAPD_THREADS in the kernel)
MAX_SEGMENTS = 65535   # gridDim.y
MAX_BLOCKS = 8192      # gridDim.x: a grid-stride loop covers the rest

Segment = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class Launch:
    table: np.ndarray            # (segments, 4) uint64: src, dst, m, k | mode << 8
    grid: tuple[int, int]        # (blocks along a segment, segments)
    block: int = THREADS


def source() -> str:
    """The kernel's CUDA C++ source, shipped beside this module."""
    return resources.files("snapd.kernels").joinpath("segments.cu").read_text()


def compile_options() -> tuple[str, ...]:
    return ("--std=c++14", f"-DSNAPD_THREADS={THREADS}")


def threads_for(m: int, k: int, mode: int) -> int:
    """Threads a segment can use: one per 16 bytes (copy) or per 16 elements (the fast (un)shuffle),
    else one per byte; more would only launch idle blocks."""
    if mode == COPY or (k in (2, 4, 8) and m % 16 == 0):
        return max(1, m // 16)
    return m * k


def launches(segs: list[Segment]) -> list[Launch]:
    """The launches that run ``segs`` (empty segments dropped), at most MAX_SEGMENTS each."""
    segs = [s for s in segs if s[2]]
    out = []
    for a in range(0, len(segs), MAX_SEGMENTS):
        batch = segs[a:a + MAX_SEGMENTS]
        for src, dst, m, k, mode in batch:
            if mode not in (COPY, SHUFFLE, UNSHUFFLE) or not 1 <= k <= 255:
                raise ValueError(f"bad segment: mode {mode}, element size {k}")
        table = np.array([(src, dst, m, k | mode << 8) for src, dst, m, k, mode in batch], dtype=np.uint64)
        threads = max(threads_for(m, k, mode) for _, _, m, k, mode in batch)
        out.append(Launch(table, (max(1, min((threads + THREADS - 1) // THREADS, MAX_BLOCKS)), len(batch))))
    return out


def chunk_segments(src: int, dst: int, nbytes: int, itemsize: int, chunk_bytes: int, mode: int,
                   shuffled: list[bool] | None = None) -> list[Segment]:
    """The segments that (un)shuffle ``nbytes`` at ``src`` into ``dst`` chunk by chunk, as the writer cuts them."""
    if itemsize <= 1:
        return [(src, dst, nbytes, 1, COPY)]
    step = chunk_step(itemsize, chunk_bytes)
    out = []
    for i, a in enumerate(range(0, nbytes, step)):
        n = min(step, nbytes - a)
        if shuffled is not None and not shuffled[i]:
            out.append((src + a, dst + a, n, 1, COPY))
        else:
            out.append((src + a, dst + a, n // itemsize, itemsize, mode))
    return out
