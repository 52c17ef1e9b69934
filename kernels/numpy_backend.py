"""The NumPy backend: the CPU path and the byte-for-byte reference for CuPy."""

from __future__ import annotations

from typing import Any

import numpy as np

from snapd.kernels.numpy_shuffle import shuffle, unshuffle_into


class NumpyBackend:
    name = "cpu"

    def shuffle(self, data: Any, itemsize: int) -> np.ndarray:
        return shuffle(data, itemsize)

    def unshuffle(self, planes: Any, itemsize: int, out: Any) -> None:
        unshuffle_into(list(planes), itemsize, out)

    def pack(self, sources: list[Any], offsets: list[int], out: np.ndarray) -> None:
        dst = out.view(np.uint8).reshape(-1)
        for src, off in zip(sources, offsets):
            b = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src.view(np.uint8).reshape(-1)
            if off < 0 or off + b.size > dst.size:
                raise ValueError(f"pack: {b.size} bytes at offset {off} do not fit {dst.size}")
            dst[off:off + b.size] = b
