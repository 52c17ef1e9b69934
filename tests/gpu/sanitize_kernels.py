"""The segment kernel's kinds of launch, run by tests/gpu/test_kernel_sanitizer.py under
compute-sanitizer, each result checked against the NumPy backend. Prints one line a case and
exits 1 on any wrong byte; the sanitizer's own exit code reports bad accesses, shared-memory
races and barrier misuse.

Every array is its own cudaMalloc (no CuPy pool), so that an access past an array's end is past
an allocation's end, where memcheck sees it. Sizes stay small: under the sanitizer a launch runs
tens of times slower.
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

from snapd.kernels.cupy_backend import CupyBackend, run_segments
from snapd.kernels.numpy_backend import NumpyBackend
from snapd.kernels.segments import SHUFFLE, UNSHUFFLE

# under one group, one group, whole tiles, a cut tile, many tiles and a partial group
COUNTS = [15, 16, 512 * 3, 512 * 2 + 100, 512 * 40 + 48]


def main() -> int:
    cp.cuda.set_allocator(None)
    gpu, cpu = CupyBackend(), NumpyBackend()
    rng = np.random.default_rng(0)
    wrong: list[str] = []

    def check(case: str, got: cp.ndarray, want: np.ndarray) -> None:
        ok = np.array_equal(cp.asnumpy(got).reshape(-1), want.reshape(-1))
        print(f"{case}: {'ok' if ok else 'WRONG BYTES'}", flush=True)
        if not ok:
            wrong.append(case)

    for k in (2, 4, 8, 3, 16):  # the fast path's three sizes, and the byte loop
        for n in COUNTS:
            data = rng.integers(0, 256, n * k, dtype=np.uint8)
            planes = gpu.shuffle(cp.asarray(data), k)
            check(f"shuffle k={k} n={n}", planes, cpu.shuffle(data, k))
            back = cp.empty(data.size, cp.uint8)
            gpu.unshuffle(planes, k, back)
            check(f"unshuffle k={k} n={n}", back, data)

    for k in (2, 4, 8):  # two blocks a segment: each warp walks many tiles, reusing its shared slots
        n = 512 * 40 + 48
        data = rng.integers(0, 256, n * k, dtype=np.uint8)
        src, planes, back = cp.asarray(data), cp.empty(data.size, cp.uint8), cp.empty(data.size, cp.uint8)
        run_segments([(src.data.ptr, planes.data.ptr, n, k, SHUFFLE)], max_blocks=2)
        check(f"looping shuffle k={k}", planes, cpu.shuffle(data, k))
        run_segments([(planes.data.ptr, back.data.ptr, n, k, UNSHUFFLE)], max_blocks=2)
        check(f"looping unshuffle k={k}", back, data)

    chunk = 16 << 10
    for k in (1, 2, 4, 8, 16):  # the daemon's pack of a window: many tensors, writer chunks, one launch
        for misalign in (0, 3):
            counts = [1, 17, 4096, chunk // k * 2 + 5, 10_003]
            host = [rng.integers(0, 256, c * k, dtype=np.uint8) for c in counts]
            offsets, pos = [], 0
            for h in host:
                pos += -pos % 64 + misalign
                offsets.append(pos)
                pos += h.size
            want = np.full(pos, 0xAB, np.uint8)
            cpu.pack(host, offsets, want, [k] * len(host), chunk)
            out = cp.full(pos, 0xAB, cp.uint8)
            gpu.pack([cp.asarray(h) for h in host], offsets, out, [k] * len(host), chunk)
            check(f"pack k={k} misalign={misalign}", out, want)
            if k > 1:
                back = cp.empty(host[3].size, cp.uint8)
                gpu.unshuffle_chunks(out[offsets[3]:offsets[3] + host[3].size], k, chunk, None, back)
                check(f"unshuffle_chunks k={k} misalign={misalign}", back, host[3])
    cp.cuda.Device().synchronize()
    print(f"{len(wrong)} wrong of the cases above", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
