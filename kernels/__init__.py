"""Byte kernels of the snapshot pipeline.

Each operation has a NumPy implementation, which defines the bytes, serves as
the CPU backend and is the test reference, and a CuPy implementation for the
GPU path (``snapd.kernels.cupy_backend``, imported only when CUDA is chosen).
``select_backend("auto"|"cuda"|"cpu")`` picks one and says why.
"""

from snapd.kernels.backend import BACKENDS, Backend, select_backend
from snapd.kernels.numpy_shuffle import chunk_step, shuffle, shuffle_chunks, unshuffle_chunks, unshuffle_into

__all__ = ["BACKENDS", "Backend", "chunk_step", "select_backend", "shuffle", "shuffle_chunks",
           "unshuffle_chunks", "unshuffle_into"]
