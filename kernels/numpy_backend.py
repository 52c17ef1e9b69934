"""The NumPy backend: the CPU path and the byte-for-byte reference for CuPy."""

from __future__ import annotations

from typing import Any

import numpy as np

from snapd.kernels.numpy_shuffle import shuffle, shuffle_chunks, unshuffle_chunks, unshuffle_into


def _bytes(a: Any) -> np.ndarray:
    return a.view(np.uint8).reshape(-1) if isinstance(a, np.ndarray) else np.frombuffer(a, dtype=np.uint8)


class NumpyBackend:
    name = "cpu"

    def shuffle(self, data: Any, itemsize: int) -> np.ndarray:
        return shuffle(data, itemsize)

    def unshuffle(self, planes: Any, itemsize: int, out: Any) -> None:
        unshuffle_into(list(planes), itemsize, out)

    def pack(self, sources: list[Any], offsets: list[int], out: np.ndarray,
             itemsizes: list[int] | None = None, chunk_bytes: int = 0) -> None:
        dst = out.view(np.uint8).reshape(-1)
        for n, (src, off) in enumerate(zip(sources, offsets)):
            b = _bytes(src)
            if off < 0 or off + b.size > dst.size:
                raise ValueError(f"pack: {b.size} bytes at offset {off} do not fit {dst.size}")
            if itemsizes is not None and chunk_bytes:
                b = shuffle_chunks(b, itemsizes[n], chunk_bytes)
            dst[off:off + b.size] = b

    def unshuffle_chunks(self, data: Any, itemsize: int, chunk_bytes: int, shuffled: list[bool] | None,
                         out: Any) -> None:
        unshuffle_chunks(data, itemsize, chunk_bytes, shuffled, out)
