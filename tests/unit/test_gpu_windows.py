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

from snapd.daemon.gpu_windows import plan
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


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("staging,pin", [(4096, 1000), (1024, 64 << 20), (1 << 20, 300)])
def test_plan_puts_every_device_byte_in_place_and_nothing_else(shuffle: bool, staging: int, pin: int) -> None:
    rng = np.random.default_rng(staging + pin + shuffle)
    sizes = [(1, 4, True), (3, 1, False), (700, 4, True), (5, 8, False), (2049, 2, True), (1, 1, True),
             (1000, 8, True), (13, 4, False), (4096, 4, True), (0, 4, True), (17, 16, True)]
    layout, total = _layout(rng, sizes)
    host = rng.integers(0, 256, total + 64, dtype=np.uint8)  # poison: what the client wrote, and padding
    want = host.copy()
    device = np.zeros(0, np.uint8)
    tensors = []
    for off, n, k, on_dev in layout:
        if not on_dev:
            continue
        data = rng.integers(0, 256, n, dtype=np.uint8)
        tensors.append((device.size, off, n, k))
        device = np.concatenate([device, data])
        want[off:off + n] = shuffle_chunks(data, k, CHUNK) if shuffle else data
    stage = np.empty(staging, np.uint8)
    for w in plan(tensors, shuffle, CHUNK, staging_bytes=staging, pin_piece=pin):
        stage[:] = 0xEE  # staging garbage between pieces must never reach the host buffer
        for p in w.pieces:
            assert 0 <= p.rel and p.rel + p.nbytes <= staging
            src = device[p.src:p.src + p.nbytes]
            stage[p.rel:p.rel + p.nbytes] = shuffle_chunks(src, p.itemsize, CHUNK) if shuffle else src
        for at, rel, n in w.copies:
            assert at // pin == (at + n - 1) // pin, "a device->host copy spans two pinned pieces"
            host[at:at + n] = stage[rel:rel + n]
    for off, n, _, on_dev in layout:  # (alignment padding between tensors may take staging garbage)
        assert np.array_equal(host[off:off + n], want[off:off + n]), ("device" if on_dev else "client", off)


def test_a_tensor_larger_than_the_staging_buffer_is_cut_at_chunk_boundaries() -> None:
    windows = plan([(0, 0, 10_000 * 4, 4)], True, CHUNK, staging_bytes=1000, pin_piece=1 << 30)
    pieces = [p for w in windows for p in w.pieces]
    assert sum(p.nbytes for p in pieces) == 40_000
    assert all(p.src % CHUNK == 0 for p in pieces)  # each piece starts a writer chunk
    assert all(p.nbytes <= 1000 for p in pieces)
