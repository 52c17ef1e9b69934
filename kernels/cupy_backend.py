"""The CUDA backend: one CuPy RawKernel that writes exactly the NumPy backend's bytes.

Every operation is a list of segments run in one launch (``blockIdx.y``
picks the segment, the x dimension strides over it). A segment is
``(src, dst, m, k | mode << 8)``:
- mode 0, copy: ``m`` bytes;
- mode 1, shuffle: ``m`` elements of ``k`` bytes into ``k`` planes of ``m`` bytes
  (``dst[p * m + i] = src[i * k + p]``): one segment per writer chunk;
- mode 2, unshuffle: the inverse.
Fast path: when both pointers are 16-byte aligned, ``m`` is a multiple of 16
and ``k`` is 2, 4 or 8, a thread loads 16 whole elements (``k`` 16-byte
loads), transposes them in registers and stores one 16-byte vector per plane,
so reads and writes are both coalesced and 16 bytes wide. Anything else
(the tail chunk of an odd-sized tensor, 16-byte elements) takes a byte loop.
"""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from snapd.kernels.numpy_shuffle import chunk_step

_SOURCE = r"""
typedef unsigned long long u64;

template <int K> __device__ __forceinline__ void shuffle16(const unsigned char* src, unsigned char* dst, u64 m, u64 e0) {
    unsigned int w[4 * K];
    const uint4* s = (const uint4*)(src + e0 * K);
#pragma unroll
    for (int j = 0; j < K; j++) { uint4 v = s[j]; w[4*j] = v.x; w[4*j+1] = v.y; w[4*j+2] = v.z; w[4*j+3] = v.w; }
#pragma unroll
    for (int p = 0; p < K; p++) {
        unsigned int o[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            unsigned int word = 0;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int b = (4 * q + r) * K + p;   // byte p of element 4q+r
                word |= ((w[b >> 2] >> (8 * (b & 3))) & 0xffu) << (8 * r);
            }
            o[q] = word;
        }
        *(uint4*)(dst + p * m + e0) = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

template <int K> __device__ __forceinline__ void unshuffle16(const unsigned char* src, unsigned char* dst, u64 m, u64 e0) {
    unsigned int w[4 * K];   // w[4p + q]: plane p, elements 4q..4q+3
#pragma unroll
    for (int p = 0; p < K; p++) {
        uint4 v = *(const uint4*)(src + p * m + e0); w[4*p] = v.x; w[4*p+1] = v.y; w[4*p+2] = v.z; w[4*p+3] = v.w;
    }
    uint4* d = (uint4*)(dst + e0 * K);
#pragma unroll
    for (int j = 0; j < K; j++) {
        unsigned int o[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            unsigned int word = 0;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int b = (4 * j + q) * 4 + r;   // output byte b: element b / K, byte b % K
                const int e = b / K, p = b % K;
                word |= ((w[4 * p + (e >> 2)] >> (8 * (e & 3))) & 0xffu) << (8 * r);
            }
            o[q] = word;
        }
        d[j] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

extern "C" __global__ void snapd_segments(const u64* __restrict__ segs) {
    const u64* s = segs + 4ULL * blockIdx.y;
    const unsigned char* src = (const unsigned char*)s[0];
    unsigned char* dst = (unsigned char*)s[1];
    const u64 m = s[2];
    const int k = (int)(s[3] & 0xffULL), mode = (int)(s[3] >> 8);
    const u64 stride = (u64)blockDim.x * gridDim.x;
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool aligned = (((u64)src | (u64)dst) & 15ULL) == 0;
    if (mode == 0) {
        if (aligned && (m & 15ULL) == 0) {
            for (u64 j = first; j < m / 16; j += stride) ((uint4*)dst)[j] = ((const uint4*)src)[j];
        } else {
            for (u64 j = first; j < m; j += stride) dst[j] = src[j];
        }
        return;
    }
    if (aligned && (m & 15ULL) == 0 && (k == 2 || k == 4 || k == 8)) {
        for (u64 g = first; g < m / 16; g += stride) {
            const u64 e0 = g * 16;
            if (mode == 1) {
                if (k == 2) shuffle16<2>(src, dst, m, e0);
                else if (k == 4) shuffle16<4>(src, dst, m, e0);
                else shuffle16<8>(src, dst, m, e0);
            } else {
                if (k == 2) unshuffle16<2>(src, dst, m, e0);
                else if (k == 4) unshuffle16<4>(src, dst, m, e0);
                else unshuffle16<8>(src, dst, m, e0);
            }
        }
        return;
    }
    const u64 total = m * (u64)k;
    for (u64 j = first; j < total; j += stride) {
        if (mode == 1) { const u64 p = j / m, i = j - p * m; dst[j] = src[i * k + p]; }
        else { const u64 i = j / k, p = j - i * k; dst[j] = src[p * m + i]; }
    }
}
"""

_THREADS = 256
_MAX_SEGMENTS = 65535  # gridDim.y
_module: Any = None
COPY, SHUFFLE, UNSHUFFLE = 0, 1, 2


def _kernel() -> Any:
    global _module  # compiled once per process, on first use (not at import)
    if _module is None:
        _module = cp.RawModule(code=_SOURCE, options=("--std=c++14",))
    return _module.get_function("snapd_segments")


def _bytes(a: Any) -> cp.ndarray:
    return cp.asarray(a).view(cp.uint8).reshape(-1)


def _threads(m: int, k: int, mode: int) -> int:
    """Threads a segment can use: one per 16 bytes (copy) or per 16 elements (the fast shuffle),
    else one per byte; more would only launch idle blocks."""
    if mode == COPY or (k in (2, 4, 8) and m % 16 == 0):
        return max(1, m // 16)
    return m * k


def run_segments(segs: list[tuple[int, int, int, int, int]], stream: Any = None) -> None:
    """Launch ``[(src_ptr, dst_ptr, m, k, mode), ...]`` (device addresses) on ``stream``."""
    segs = [s for s in segs if s[2]]
    for a in range(0, len(segs), _MAX_SEGMENTS):
        batch = segs[a:a + _MAX_SEGMENTS]
        table = np.array([(src, dst, m, k | mode << 8) for src, dst, m, k, mode in batch], dtype=np.uint64)
        threads = max(_threads(m, k, mode) for _, _, m, k, mode in batch)
        grid = (max(1, min((threads + _THREADS - 1) // _THREADS, 8192)), len(batch))
        with (stream if stream is not None else cp.cuda.get_current_stream()):
            dev = cp.asarray(table)  # copied on this stream: ordered before the launch
            _kernel()(grid, (_THREADS,), (dev,))


def chunk_segments(src: int, dst: int, nbytes: int, itemsize: int, chunk_bytes: int, mode: int,
                   shuffled: list[bool] | None = None) -> list[tuple[int, int, int, int, int]]:
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
                segs += chunk_segments(b.data.ptr, dst.data.ptr + off, b.size, itemsizes[n], chunk_bytes, SHUFFLE)
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
