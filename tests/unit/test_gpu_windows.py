"""The daemon's GPU copy plan (snapd.daemon.gpu_windows), executed with NumPy on the CPU.

On a GPU each window is one kernel launch (pack, chunk shuffle) into the
staging buffer and a few device->host copies; here the same plan runs over
byte arrays standing in for device memory, the staging buffer and the host
buffer. What must hold whatever the sizes: every device tensor lands at its
offset (as the writer's chunk planes when shuffling), and no byte of the host
buffer holding a tensor the client copied itself changes (those sit in gaps
between device tensors; only alignment padding may take staging garbage).
"""

from __future__ import annotations

import numpy as np
import pytest

from snapd.daemon.gpu_windows import Piece, Window, plan, segments
from snapd.kernels import shuffle_chunks

CHUNK = 256


def _layout(rng: np.random.Generator, sizes: list[tuple[int, int, bool]]) -> tuple[list, int]:
    """[(offset, nbytes, itemsize, on_device)] at 64-byte aligned offsets, as the client lays them out."""
    out, pos = [], 0
    for n, k, on_dev in sizes:
        pos += -pos % 64
        out.append((pos, n * k, k, on_dev))
        pos += n * k
    return out, pos


SIZES = [(1, 4, True), (3, 1, False), (700, 4, True), (5, 8, False), (2049, 2, True), (1, 1, True),
         (1000, 8, True), (13, 4, False), (4096, 4, True), (0, 4, True), (17, 16, True), (1024, 2, True)]


def _numpy_kernel(device: np.ndarray, stage: np.ndarray):
    """Runs a window's pieces with NumPy, device addresses being offsets into ``device``."""
    def run(w, shuffle: bool) -> None:
        for p in w.pieces:
            assert 0 <= p.rel and p.rel + p.nbytes <= stage.size
            src = device[p.src:p.src + p.nbytes]
            stage[p.rel:p.rel + p.nbytes] = shuffle_chunks(src, p.itemsize, CHUNK) if shuffle else src
    return run


def _check_plan(rng: np.random.Generator, shuffle: bool, staging: int, pin: int, kernel) -> None:
    """Stage every device tensor through ``plan``'s windows with ``kernel(device, stage)`` and check the
    host buffer: each device tensor in place, each tensor the client copied untouched."""
    layout, total = _layout(rng, SIZES)
    host = rng.integers(0, 256, total + 64, dtype=np.uint8)  # poison: what the client wrote, and padding
    want = host.copy()
    datas, tensors = [], []
    for off, n, k, on_dev in layout:
        if on_dev:
            datas.append(rng.integers(0, 256, n, dtype=np.uint8))
            tensors.append((sum(d.size for d in datas[:-1]), off, n, k))
            want[off:off + n] = shuffle_chunks(datas[-1], k, CHUNK) if shuffle else datas[-1]
    device = np.concatenate(datas)
    stage = np.empty(staging, np.uint8)
    run = kernel(device, stage)
    for w in plan(tensors, shuffle, CHUNK, staging_bytes=staging, pin_piece=pin):
        stage[:] = 0xEE  # staging garbage between pieces must never reach the host buffer
        run(w, shuffle)
        for at, rel, n in w.copies:
            assert at // pin == (at + n - 1) // pin, "a device->host copy spans two pinned pieces"
            host[at:at + n] = stage[rel:rel + n]
    for off, n, _, on_dev in layout:  # (alignment padding between tensors may take staging garbage)
        assert np.array_equal(host[off:off + n], want[off:off + n]), ("device" if on_dev else "client", off)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("staging,pin", [(4096, 1000), (1024, 64 << 20), (1 << 20, 300)])
def test_plan_puts_every_device_byte_in_place_and_nothing_else(shuffle: bool, staging: int, pin: int) -> None:
    _check_plan(np.random.default_rng(staging + pin + shuffle), shuffle, staging, pin, _numpy_kernel)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("staging,pin", [(4096, 1000), (1 << 20, 300)])
def test_plan_through_the_segment_kernel(shuffle: bool, staging: int, pin: int, host_kernel) -> None:
    """The same through what the daemon launches: gpu_windows.segments run by the CUDA kernel's source
    built for the host, over host arrays standing in for device memory and the staging buffer."""
    def kernel(device: np.ndarray, stage: np.ndarray):
        base = device.ctypes.data

        def run(w, shuffle: bool) -> None:
            moved = Window(w.start, [Piece(base + p.src, p.rel, p.nbytes, p.itemsize) for p in w.pieces])
            host_kernel(segments(moved, stage.ctypes.data, shuffle, CHUNK))
        return run

    _check_plan(np.random.default_rng(staging + pin + shuffle + 7), shuffle, staging, pin, kernel)


def test_a_tensor_larger_than_the_staging_buffer_is_cut_at_chunk_boundaries() -> None:
    windows = plan([(0, 0, 10_000 * 4, 4)], True, CHUNK, staging_bytes=1000, pin_piece=1 << 30)
    pieces = [p for w in windows for p in w.pieces]
    assert sum(p.nbytes for p in pieces) == 40_000
    assert all(p.src % CHUNK == 0 for p in pieces)  # each piece starts a writer chunk
    assert all(p.nbytes <= 1000 for p in pieces)
