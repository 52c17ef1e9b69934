"""The CUDA backend: the segment kernel (``segments.cu``) through CuPy, writing exactly the NumPy
backend's bytes.

Each operation becomes a list of segments (``segments.py``) run in one launch
on the current or a given stream.
"""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from snapd.kernels.segments import (COPY, MAX_BLOCKS, SHUFFLE, UNSHUFFLE, Launch, Segment, chunk_segments,
                                    compile_options, launches, source)

__all__ = ["COPY", "SHUFFLE", "UNSHUFFLE", "CupyBackend", "chunk_segments", "run_launches", "run_segments"]

_module: Any = None


def _kernel() -> Any:
    global _module  # compiled once per process, on first use (not at import)
    if _module is None:
        _module = cp.RawModule(code=source(), options=compile_options())
    return _module.get_function("snapd_segments")


def _bytes(a: Any) -> cp.ndarray:
    return cp.asarray(a).view(cp.uint8).reshape(-1)


def run_segments(segs: list[Segment], stream: Any = None, max_blocks: int = MAX_BLOCKS) -> None:
    """Launch ``[(src_ptr, dst_ptr, m, k, mode), ...]`` (device addresses) on ``stream``
    (``max_blocks``: blocks a segment; the tests take fewer, so that blocks loop over tiles)."""
    run_launches(launches(segs, max_blocks), stream)


def run_launches(prepared: list[Launch], stream: Any = None) -> None:
    """Run launches made by ``segments.launches`` (made once, run for every snapshot of a layout)."""
    for launch in prepared:
        with (stream if stream is not None else cp.cuda.get_current_stream()):
            dev = cp.asarray(launch.table)  # copied on this stream: ordered before the launch
            _kernel()((launch.blocks,), (launch.block,), (dev, np.uint32(launch.segments)))


class CupyBackend:
    name = "cuda"

    def shuffle(self, data: Any, itemsize: int) -> cp.ndarray:
        src = _bytes(data)
        if itemsize <= 1:
            return src.reshape(1, -1).copy()
        if src.size % itemsize:
            raise ValueError(f"{src.size} bytes is not a whole number of {itemsize}-byte elements")
        out = cp.empty((itemsize, src.size // itemsize), dtype=cp.uint8)
        run_segments([(src.data.ptr, out.data.ptr, src.size // itemsize, itemsize, SHUFFLE)])
        return out

    def unshuffle(self, planes: Any, itemsize: int, out: Any) -> None:
        dst = out.view(cp.uint8).reshape(-1)
        src = cp.ascontiguousarray(cp.asarray(planes).view(cp.uint8)).reshape(-1)
        if src.size != dst.size:
            raise ValueError(f"unshuffle: {src.size} plane bytes for {dst.size} output bytes")
        if itemsize <= 1:
            dst[...] = src
            return
        run_segments([(src.data.ptr, dst.data.ptr, dst.size // itemsize, itemsize, UNSHUFFLE)])

    def pack(self, sources: list[Any], offsets: list[int], out: Any, itemsizes: list[int] | None = None,
             chunk_bytes: int = 0) -> None:
        dst = out.view(cp.uint8).reshape(-1)
        segs = []
        for n, (s, off) in enumerate(zip(sources, offsets)):
            b = _bytes(s)
            if off < 0 or off + b.size > dst.size:
                raise ValueError(f"pack: {b.size} bytes at offset {off} do not fit {dst.size}")
            if itemsizes is not None and chunk_bytes:
                segs += chunk_segments(b.data.ptr, dst.data.ptr + off, b.size, itemsizes[n], chunk_bytes,
                                       SHUFFLE)
            else:
                segs.append((b.data.ptr, dst.data.ptr + off, b.size, 1, COPY))
        run_segments(segs)

    def unshuffle_chunks(self, data: Any, itemsize: int, chunk_bytes: int, shuffled: list[bool] | None,
                         out: Any) -> None:
        src, dst = _bytes(data), out.view(cp.uint8).reshape(-1)
        if src.size != dst.size:
            raise ValueError(f"unshuffle_chunks: {src.size} bytes in, {dst.size} out")
        run_segments(chunk_segments(src.data.ptr, dst.data.ptr, src.size, itemsize, chunk_bytes, UNSHUFFLE,
                                    shuffled))
