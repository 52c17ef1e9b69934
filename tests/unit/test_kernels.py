"""The NumPy kernel backend (the CPU path and the CuPy reference) and backend choice."""

import numpy as np
import pytest

from snapd.kernels import select_backend
from snapd.kernels.numpy_backend import NumpyBackend


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 7, 4099])
def test_shuffle_round_trip(itemsize, n) -> None:
    b = NumpyBackend()
    data = np.random.default_rng(n).integers(0, 256, n * itemsize, dtype=np.uint8)
    planes = b.shuffle(data, itemsize)
    assert planes.shape == (itemsize, n) or itemsize == 1
    if itemsize > 1 and n > 1:
        assert planes[itemsize - 1, 1] == data[2 * itemsize - 1]  # plane p holds byte p of each element
    out = np.empty_like(data)
    b.unshuffle(planes, itemsize, out)
    assert np.array_equal(out, data)


def test_pack_gathers_at_offsets_and_refuses_overflow() -> None:
    b = NumpyBackend()
    srcs = [np.arange(10, dtype=np.uint8), np.arange(3, dtype=np.float32), np.zeros(0, np.uint8)]
    out = np.full(128, 255, np.uint8)
    b.pack(srcs, [0, 64, 100], out)
    assert out[:10].tolist() == list(range(10)) and out[10] == 255
    assert np.array_equal(out[64:76].view(np.float32), np.arange(3, dtype=np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        b.pack([np.ones(100, np.uint8)], [64], out)


def test_select_backend() -> None:
    backend, why = select_backend("cpu")
    assert backend.name == "cpu" and why.startswith("cpu")
    backend, why = select_backend("auto")
    assert backend.name in ("cpu", "cuda") and why
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("tpu")
    if backend.name == "cpu":
        with pytest.raises(RuntimeError, match="backend cuda was asked for"):
            select_backend("cuda")
