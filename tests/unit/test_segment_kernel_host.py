"""The GPU segment kernel (kernels/segments.cu) compiled for the CPU and run over host memory.

The source is the one CuPy compiles, built with g++ through a small shim
(tests/kernel_host): each lane is a coroutine, switched at ``__syncwarp``, so a
missing barrier shows as bytes read before they were written. Every 16-byte
access is checked as a GPU would fault on it (aligned, inside the launch's
segments), and guard bytes round each buffer catch stray byte stores. The
launches come from kernels/segments.py, as on the GPU. So the kernel's
indexing, its tiles through shared memory and the launch arithmetic are
checked against the NumPy backend, byte for byte, on every CI run; only the
device itself (its memory model, its compiler) waits for tests/gpu.
"""

from __future__ import annotations

import numpy as np
import pytest

from snapd.kernels import numpy_shuffle
from snapd.kernels.numpy_backend import NumpyBackend
from snapd.kernels.segments import COPY, SHUFFLE, UNSHUFFLE, chunk_segments, launches


@pytest.fixture
def buffer():
    """``buffer(nbytes, misalign, rng)``: ``nbytes`` of poison (so an unwritten byte shows) starting
    ``misalign`` bytes past a 64-byte boundary, between 64 guard bytes or more on either side that
    the kernel must leave as they are (checked when the test ends)."""
    made: list[tuple[np.ndarray, slice, np.ndarray]] = []

    def make(nbytes: int, misalign: int, rng: np.random.Generator) -> np.ndarray:
        raw = rng.integers(0, 256, nbytes + 256, dtype=np.uint8)
        start = 64 + -(raw.ctypes.data + 64) % 64 + misalign
        made.append((raw, slice(start, start + nbytes), raw.copy()))
        return raw[start:start + nbytes]
    yield make
    for raw, inside, before in made:
        raw[inside] = before[inside]
        assert np.array_equal(raw, before), "the kernel wrote next to a buffer"


# element counts: under one group, a group, tiles whole and cut, a tile plus a partial group
COUNTS = [1, 15, 16, 17, 512, 512 * 3, 512 * 3 + 16, 512 * 2 + 100, 4099]


@pytest.mark.parametrize("itemsize", [2, 4, 8, 1, 16, 3])
@pytest.mark.parametrize("misalign", [0, 1, 8])
def test_shuffle_and_unshuffle_equal_numpy(host_kernel, buffer, itemsize, misalign) -> None:
    rng = np.random.default_rng(itemsize * 10 + misalign)
    for n in COUNTS:
        data = buffer(n * itemsize, misalign, rng)
        data[:] = rng.integers(0, 256, data.size, dtype=np.uint8)
        planes = buffer(data.size, misalign, rng)
        mode = COPY if itemsize == 1 else SHUFFLE
        host_kernel([(data.ctypes.data, planes.ctypes.data, n, itemsize, mode)])
        assert np.array_equal(planes, numpy_shuffle.shuffle(data, itemsize).reshape(-1)), (n, itemsize)
        back = buffer(data.size, misalign, rng)
        mode = COPY if itemsize == 1 else UNSHUFFLE
        host_kernel([(planes.ctypes.data, back.ctypes.data, n, itemsize, mode)])
        assert np.array_equal(back, data), (n, itemsize)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_blocks_loop_over_every_tile_beside_other_segments(host_kernel, buffer, itemsize) -> None:
    """Segments of one launch capped at 2 blocks: 41 tiles are walked by 16 warps, each warp
    reusing its shared slots; beside them, segments of a cut tile, one tile and 9 tiles."""
    rng = np.random.default_rng(itemsize)
    counts = [48, 512 * 40 + 48, 512, 512 * 9]
    datas = [buffer(n * itemsize, 0, rng) for n in counts]
    planes = [buffer(d.size, 0, rng) for d in datas]
    backs = [buffer(d.size, 0, rng) for d in datas]
    host_kernel([(d.ctypes.data, p.ctypes.data, n, itemsize, SHUFFLE) for d, p,
                 n in zip(datas, planes, counts)],
                max_blocks=2)
    host_kernel([(p.ctypes.data, b.ctypes.data, n, itemsize, UNSHUFFLE) for p, b,
                 n in zip(planes, backs, counts)],
                max_blocks=2)
    for d, p, b in zip(datas, planes, backs):
        assert np.array_equal(p, numpy_shuffle.shuffle(d, itemsize).reshape(-1))
        assert np.array_equal(b, d)


def test_each_segment_gets_the_blocks_its_work_fills() -> None:
    """A small segment beside a large one takes one block, not as many as the large one: the
    grid is the sum of what each needs (capped per segment), each segment's first block in its row."""
    segs = [(0, 0, 256 << 20, 1, COPY), (0, 0, 4096, 1, COPY), (0, 0, 1 << 20, 4, SHUFFLE),
            (0, 0, 5, 4, SHUFFLE), (0, 0, 0, 1, COPY), (0, 0, 100, 2, UNSHUFFLE)]
    (launch,) = launches(segs)
    want = [8192, 1, 256, 1, 1]  # 16 Mi vectors (capped), 256 vectors, 64 Ki groups, 20 bytes, 200 bytes
    assert launch.segments == 5 and launch.blocks == sum(want)
    starts = [int(w) >> 16 for w in launch.table[:, 3]]
    assert starts == [sum(want[:i]) for i in range(5)]
    assert [int(w) & 0xffff for w in launch.table[:, 3]] == [1, 1, 4 | 1 << 8, 4 | 1 << 8, 2 | 2 << 8]


@pytest.mark.parametrize("aligned", [True, False])
def test_pack_with_chunk_shuffle_in_one_launch(host_kernel, buffer, aligned) -> None:
    """What the daemon's GPU copy launches: many sources of mixed element sizes, each cut in the
    writer's chunks and shuffled, into one staging region, against NumpyBackend.pack."""
    rng = np.random.default_rng(int(aligned))
    chunk = 16 << 10
    sizes = [(4, 8192 + 16), (2, 100_003), (8, 512 * 5), (1, 999), (4, 3), (16, 700), (2, 0)]
    host = [rng.integers(0, 256, n * k, dtype=np.uint8) for k, n in sizes]
    offsets, pos = [], 0
    for h in host:
        pos += -pos % (64 if aligned else 1) + (0 if aligned else 3)
        offsets.append(pos)
        pos += h.size
    want = np.zeros(pos, np.uint8)
    NumpyBackend().pack(host, offsets, want, [k for k, _ in sizes], chunk)
    out = buffer(pos, 0, rng)
    segs = []
    for (k, _), h, off in zip(sizes, host, offsets):
        segs += chunk_segments(h.ctypes.data, out.ctypes.data + off, h.size, k, chunk, SHUFFLE)
    host_kernel(segs)
    gaps = np.ones(pos, bool)
    for h, off in zip(host, offsets):
        gaps[off:off + h.size] = False
    assert np.array_equal(out[~gaps], want[~gaps])

    back = buffer(pos, 0, rng)
    host_kernel([seg for (k, _), h, off in zip(sizes, host, offsets)
            for seg in chunk_segments(out.ctypes.data + off, back.ctypes.data + off, h.size, k, chunk,
                                      UNSHUFFLE)])
    for h, off in zip(host, offsets):
        assert np.array_equal(back[off:off + h.size], h)


def test_unshuffle_chunks_keeps_chunks_stored_unshuffled(host_kernel, buffer) -> None:
    """A restore's segments: chunks the writer stored plain are copied, the rest unshuffled."""
    rng = np.random.default_rng(5)
    chunk, k = 16 << 10, 4
    data = rng.integers(0, 256, chunk * 3 + 4 * 37, dtype=np.uint8)
    shuffled = [True, False, True, False]
    stored = numpy_shuffle.shuffle_chunks(data, k, chunk)
    for i, keep in enumerate(shuffled):
        if not keep:
            stored[i * chunk:(i + 1) * chunk] = data[i * chunk:(i + 1) * chunk]
    out = buffer(data.size, 0, rng)
    host_kernel(chunk_segments(stored.ctypes.data, out.ctypes.data, data.size, k, chunk, UNSHUFFLE, shuffled))
    assert np.array_equal(out, data)


def test_bad_segment_is_refused_before_launch() -> None:
    with pytest.raises(ValueError, match="mode 7"):
        launches([(0, 0, 16, 4, 7)])
    with pytest.raises(ValueError, match="element size 0"):
        launches([(0, 0, 16, 0, SHUFFLE)])
