"""The kernel backend interface, and choosing a backend.

Two implementations compute exactly the same bytes: ``NumpyBackend`` (the
CPU path and the reference) and ``CupyBackend`` (CUDA). Operations:
- ``shuffle(data, itemsize)``: ``(itemsize, n)`` byte planes (the format's shuffle filter);
- ``unshuffle(planes, itemsize, out)``: the inverse, into ``out``;
- ``pack(sources, offsets, out, itemsizes=None, chunk_bytes=0)``: gather many
  contiguous byte arrays into one staging region at the given (aligned)
  offsets, in one launch on the GPU; with ``itemsizes`` and ``chunk_bytes``
  each source is also cut into the writer's chunks and each chunk shuffled
  (``shuffle_chunks``: what the encoder would shuffle, done on the device);
- ``unshuffle_chunks(data, itemsize, chunk_bytes, shuffled, out)``: the inverse,
  for restores onto the device.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "cpu")


class Backend(Protocol):
    name: str

    def shuffle(self, data: Any, itemsize: int) -> Any: ...

    def unshuffle(self, planes: Any, itemsize: int, out: Any) -> None: ...

    def pack(self, sources: list[Any], offsets: list[int], out: Any, itemsizes: list[int] | None = None,
             chunk_bytes: int = 0) -> None: ...

    def unshuffle_chunks(self, data: Any, itemsize: int, chunk_bytes: int, shuffled: list[bool] | None,
                         out: Any) -> None: ...


def select_backend(choice: str = "auto") -> tuple[Backend, str]:
    """The backend for ``choice`` (auto|cuda|cpu) and the reason, to be logged once by the caller."""
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    from snapd.kernels.numpy_backend import NumpyBackend

    if choice == "cpu":
        return NumpyBackend(), "cpu: asked for"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, no driver or no device: all mean "no CUDA here"
        if choice == "cuda":
            raise RuntimeError(f"backend cuda was asked for, but CUDA is not usable: {type(e).__name__}: "
                               f"{e}") from e
        return NumpyBackend(), f"cpu: CUDA not usable ({type(e).__name__})"
    if count == 0:
        if choice == "cuda":
            raise RuntimeError("backend cuda was asked for, but no CUDA device is present")
        return NumpyBackend(), "cpu: no CUDA device"
    from snapd.kernels.cupy_backend import CupyBackend

    return CupyBackend(), f"cuda: CuPy {cupy.__version__}, {count} device(s)"
