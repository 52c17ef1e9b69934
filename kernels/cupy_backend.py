"""The CUDA backend: CuPy RawKernels that write exactly the NumPy backend's bytes.

Not yet run on a GPU (written without one; tests/gpu/ checks it against the
NumPy twin byte for byte wherever a device is present).

- shuffle: one thread per byte of output plane p, element i:
  ``planes[p * n + i] = data[i * k + p]``; reads are strided, writes coalesced.
- unshuffle: the inverse, ``out[i * k + p] = planes[p * n + i]``; writes
  coalesced by making the thread index run over the output bytes.
- pack: one launch for many tensors: blockIdx.y picks the tensor, the x
  dimension strides over its bytes, 16 bytes at a time when source, destination
  and length allow it (the usual case: allocations and our 64-byte offsets are
  16-aligned), else byte by byte.
"""

from __future__ import annotations

from typing import Any

import cupy as cp

_SHUFFLE = r"""
extern "C" __global__ void snapd_shuffle(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                         const unsigned long long n, const int k) {
    const unsigned long long total = n * (unsigned long long)k;
    for (unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; j < total;
         j += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned long long p = j / n, i = j - p * n;   // j indexes dst: plane p, element i
        dst[j] = src[i * k + p];
    }
}
extern "C" __global__ void snapd_unshuffle(const unsigned char* __restrict__ planes, unsigned char* __restrict__ dst,
                                           const unsigned long long n, const int k) {
    const unsigned long long total = n * (unsigned long long)k;
    for (unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; j < total;
         j += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned long long i = j / k, p = j - i * k;   // j indexes dst: element i, byte p
        dst[j] = planes[p * n + i];
    }
}
extern "C" __global__ void snapd_pack(const unsigned long long* __restrict__ srcs,
                                      const unsigned long long* __restrict__ sizes,
                                      const unsigned long long* __restrict__ offsets, unsigned char* __restrict__ dst) {
    const unsigned long long t = blockIdx.y;
    const unsigned char* src = (const unsigned char*)srcs[t];
    unsigned char* out = dst + offsets[t];
    const unsigned long long size = sizes[t];
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    const unsigned long long first = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if ((((unsigned long long)src | (unsigned long long)out | size) & 15ULL) == 0) {
        const uint4* s = (const uint4*)src;
        uint4* d = (uint4*)out;
        for (unsigned long long j = first; j < size / 16; j += stride) d[j] = s[j];
    } else {
        for (unsigned long long j = first; j < size; j += stride) out[j] = src[j];
    }
}
"""

_THREADS = 256
_module: Any = None


def _kernels() -> Any:
    global _module  # compiled once per process, on first use (not at import)
    if _module is None:
        _module = cp.RawModule(code=_SHUFFLE, options=("--std=c++14",))
    return _module


def _grid(total: int) -> int:
    return max(1, min((total + _THREADS - 1) // _THREADS, 65535 * 4))


class CupyBackend:
    name = "cuda"

    def shuffle(self, data: Any, itemsize: int) -> cp.ndarray:
        src = cp.asarray(data).view(cp.uint8).reshape(-1)
        if itemsize <= 1:
            return src.reshape(1, -1).copy()
        if src.size % itemsize:
            raise ValueError(f"{src.size} bytes is not a whole number of {itemsize}-byte elements")
        n = src.size // itemsize
        out = cp.empty((itemsize, n), dtype=cp.uint8)
        if n:
            _kernels().get_function("snapd_shuffle")((_grid(src.size),), (_THREADS,),
                                                     (src, out, cp.uint64(n), cp.int32(itemsize)))
        return out

    def unshuffle(self, planes: Any, itemsize: int, out: Any) -> None:
        dst = out.view(cp.uint8).reshape(-1)
        src = cp.ascontiguousarray(cp.asarray(planes).view(cp.uint8)).reshape(-1)
        if src.size != dst.size:
            raise ValueError(f"unshuffle: {src.size} plane bytes for {dst.size} output bytes")
        if itemsize <= 1:
            dst[...] = src
            return
        n = dst.size // itemsize
        if n:
            _kernels().get_function("snapd_unshuffle")((_grid(dst.size),), (_THREADS,),
                                                       (src, dst, cp.uint64(n), cp.int32(itemsize)))

    def pack(self, sources: list[Any], offsets: list[int], out: Any) -> None:
        dst = out.view(cp.uint8).reshape(-1)
        srcs = [cp.asarray(s).view(cp.uint8).reshape(-1) for s in sources]
        for s, off in zip(srcs, offsets):
            if off < 0 or off + s.size > dst.size:
                raise ValueError(f"pack: {s.size} bytes at offset {off} do not fit {dst.size}")
        live = [(s, off) for s, off in zip(srcs, offsets) if s.size]
        if not live:
            return
        for a in range(0, len(live), 65535):  # gridDim.y is at most 65535 tensors a launch
            batch = live[a:a + 65535]
            ptrs = cp.asarray([s.data.ptr for s, _ in batch], dtype=cp.uint64)
            sizes = cp.asarray([s.size for s, _ in batch], dtype=cp.uint64)
            offs = cp.asarray([off for _, off in batch], dtype=cp.uint64)
            biggest = max(s.size for s, _ in batch)
            grid = (max(1, min((biggest // 16 + _THREADS - 1) // _THREADS, 1024)), len(batch))
            _kernels().get_function("snapd_pack")(grid, (_THREADS,), (ptrs, sizes, offs, dst))
