"""Segment tables and launch geometry for the segment kernel (``segments.cu``), without CuPy.

A segment is ``(src, dst, m, k, mode)`` over device addresses (see the kernel's
header for the modes). This module turns a list of them into launches: the
``uint64`` table the kernel reads and its grid. ``cupy_backend`` runs those on
a stream; the host emulator in the tests runs the very same launches over host
memory, so the launch arithmetic and the kernel are checked wherever the tests find g++.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

from snapd.kernels.numpy_shuffle import chunk_step

COPY, SHUFFLE, UNSHUFFLE = 0, 1, 2
THREADS = 256          # threads per block (SNAPD_THREADS in the kernel)
MAX_SEGMENTS = 65535   # segments a launch (a table of 2 MiB at most)
MAX_BLOCKS = 8192      # blocks a segment: a grid-stride loop covers the rest

Segment = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class Launch:
    table: np.ndarray            # (segments, 4) uint64: src, dst, m, k | mode << 8 | first block << 16
    blocks: int                  # the grid: every segment's blocks, one after another
    block: int = THREADS

    @property
    def segments(self) -> int:
        return int(self.table.shape[0])


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


def launches(segs: list[Segment], max_blocks: int = MAX_BLOCKS) -> list[Launch]:
    """The launches that run ``segs`` (empty segments dropped), at most MAX_SEGMENTS each. Each
    segment gets the blocks its work fills, up to ``max_blocks``, so a small segment beside a large
    one costs one block, not as many as the large one needs."""
    segs = [s for s in segs if s[2]]
    out = []
    for a in range(0, len(segs), MAX_SEGMENTS):
        rows, start = [], 0
        for src, dst, m, k, mode in segs[a:a + MAX_SEGMENTS]:
            if mode not in (COPY, SHUFFLE, UNSHUFFLE) or not 1 <= k <= 255:
                raise ValueError(f"bad segment: mode {mode}, element size {k}")
            rows.append((src, dst, m, k | mode << 8 | start << 16))
            start += min(max_blocks, -(-threads_for(m, k, mode) // THREADS))
        out.append(Launch(np.array(rows, dtype=np.uint64), start))
    return out


def chunk_segments(src: int, dst: int, nbytes: int, itemsize: int, chunk_bytes: int, mode: int,
                   shuffled: list[bool] | None = None) -> list[Segment]:
    """The segments that (un)shuffle ``nbytes`` at ``src`` into ``dst`` chunk by chunk, as the writer
    cuts them."""
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
