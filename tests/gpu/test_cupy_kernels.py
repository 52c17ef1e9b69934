"""CuPy kernels against their NumPy twin, byte for byte (skipped without CUDA)."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SIZES = [1, 2, 3, 255, 4096, 4096 + 80, 1 << 20, 1_000_003]  # whole tiles, a cut tile, odd


@pytest.fixture(scope="module")
def backends():
    from snapd.kernels.cupy_backend import CupyBackend
    from snapd.kernels.numpy_backend import NumpyBackend

    return CupyBackend(), NumpyBackend()


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "float16", "float32", "int64", "complex64",
                                   "complex128"])
@pytest.mark.parametrize("n", SIZES)
def test_shuffle_and_unshuffle_equal_numpy(backends, dtype, n) -> None:
    import cupy as cp

    gpu, cpu = backends
    size = np.dtype(dtype).itemsize
    data = np.random.default_rng(n).integers(0, 256, n * size, dtype=np.uint8)
    want = cpu.shuffle(data, size)
    got = gpu.shuffle(cp.asarray(data), size)
    assert np.array_equal(cp.asnumpy(got), want)
    out = cp.empty(data.size, cp.uint8)
    gpu.unshuffle(got, size, out)
    assert np.array_equal(cp.asnumpy(out), data)


def test_bf16_and_fp8_from_torch(backends) -> None:
    torch = pytest.importorskip("torch")
    import cupy as cp

    gpu, cpu = backends
    for dt in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.randn(100_003, device="cuda").to(dt)
        raw = t.view(torch.uint8)
        want = cpu.shuffle(raw.cpu().numpy(), t.element_size())
        assert np.array_equal(cp.asnumpy(gpu.shuffle(cp.asarray(raw), t.element_size())), want)


@pytest.mark.parametrize("aligned", [True, False])
def test_pack_equals_numpy(backends, aligned) -> None:
    import cupy as cp

    gpu, cpu = backends
    rng = np.random.default_rng(1)
    sizes = [0, 1, 17, 4096, 1 << 20, 999_999]
    host = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    offsets, pos = [], 0
    for s in sizes:
        pos += -pos % (64 if aligned else 1)
        offsets.append(pos)
        pos += s
    want = np.zeros(pos, np.uint8)
    cpu.pack(host, offsets, want)
    out = cp.zeros(pos, cp.uint8)
    gpu.pack([cp.asarray(h) for h in host], offsets, out)
    assert np.array_equal(cp.asnumpy(out), want)


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("aligned", [True, False])
def test_pack_with_chunk_shuffle_equals_numpy(backends, itemsize, aligned) -> None:
    """The GPU copy's pack+shuffle: every source cut in writer chunks, each chunk's planes; the
    fast path (16-byte aligned, whole 16-element groups) and the byte loop both."""
    import cupy as cp

    gpu, cpu = backends
    rng = np.random.default_rng(itemsize * 2 + aligned)
    chunk = 64 << 10
    counts = [0, 1, 15, 16, 17, 4096, (chunk // itemsize) * 3 + 16, (chunk // itemsize) * 2 + 5, 100_003]
    host = [rng.integers(0, 256, c * itemsize, dtype=np.uint8) for c in counts]
    offsets, pos = [], 0
    for h in host:
        pos += -pos % 64 + (0 if aligned else 3)
        offsets.append(pos)
        pos += h.size
    want = np.full(pos, 0xAB, np.uint8)
    cpu.pack(host, offsets, want, [itemsize] * len(host), chunk)
    out = cp.full(pos, 0xAB, cp.uint8)  # poisoned: every byte the kernel must write is checked
    gpu.pack([cp.asarray(h) for h in host], offsets, out, [itemsize] * len(host), chunk)
    assert np.array_equal(cp.asnumpy(out), want)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_unshuffle_chunks_equals_numpy(backends, itemsize) -> None:
    import cupy as cp

    gpu, cpu = backends
    rng = np.random.default_rng(itemsize)
    chunk = 64 << 10
    data = rng.integers(0, 256, (chunk // itemsize * 5 + 7) * itemsize, dtype=np.uint8)
    mask = [True, False, True, True, False, True]  # a chunk the writer stored raw stays as it is
    want = np.empty_like(data)
    cpu.unshuffle_chunks(data, itemsize, chunk, mask, want)
    out = cp.full(data.size, 0xAB, cp.uint8)
    gpu.unshuffle_chunks(cp.asarray(data), itemsize, chunk, mask, out)
    assert np.array_equal(cp.asnumpy(out), want)
    back = cp.empty_like(out)
    gpu.pack([out], [0], back, [itemsize], chunk)  # and shuffling it again gives the input back
    assert np.array_equal(cp.asnumpy(back)[:chunk], data[:chunk])
