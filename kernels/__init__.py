"""Byte kernels of the snapshot pipeline.

Each operation has a NumPy implementation (``snapd.kernels.numpy_shuffle``),
which defines the bytes, serves as the CPU backend and is the test reference
for the CuPy kernels of the GPU path.
"""

from snapd.kernels.numpy_shuffle import shuffle, unshuffle_into

__all__ = ["shuffle", "unshuffle_into"]
