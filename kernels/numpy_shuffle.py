"""Byte shuffle (the blosc filter) in NumPy: the reference bytes.

``shuffle`` splits ``n`` elements of ``k`` bytes each into ``k`` planes:
plane ``p`` holds byte ``p`` of every element, in element order. For IEEE
floats on little-endian machines the last plane holds sign and high
exponent bits, which is what compresses.

Copying plane by plane (one strided copy per plane) runs at ~2 GB/s on one
core here, against ~0.4 GB/s for ``planes.T`` as one transposing copy; that
is why both directions loop over planes.
"""

from __future__ import annotations

import numpy as np


def shuffle(data: memoryview | bytes | np.ndarray, itemsize: int) -> np.ndarray:
    """Return a ``(itemsize, n)`` uint8 array of the byte planes of ``data``.

    ``len(data)`` must be a multiple of ``itemsize``.
    """
    src = np.frombuffer(data, dtype=np.uint8)
    if itemsize <= 1:
        return src.reshape(1, -1)
    if src.size % itemsize:
        raise ValueError(f"{src.size} bytes is not a whole number of {itemsize}-byte elements")
    elems = src.reshape(-1, itemsize)
    planes = np.empty((itemsize, elems.shape[0]), dtype=np.uint8)
    for p in range(itemsize):
        planes[p] = elems[:, p]
    return planes


def unshuffle_into(planes: list[bytes | memoryview | np.ndarray], itemsize: int,
                   out: memoryview | np.ndarray) -> None:
    """Write the bytes whose planes are ``planes`` into ``out`` (writable, uint8-sized)."""
    dst = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out.view(np.uint8)
    if itemsize <= 1:
        dst[:] = np.frombuffer(planes[0], dtype=np.uint8)
        return
    elems = dst.reshape(-1, itemsize)
    for p in range(itemsize):
        elems[:, p] = np.frombuffer(planes[p], dtype=np.uint8)
