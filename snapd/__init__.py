"""snapd: a per-node snapshot daemon for machine-learning training.

The package is split so that training code pays only for what it uses:
``snapd.format`` (the on-disk format) and ``snapd.client`` import NumPy and
nothing heavier; torch is imported only when the user's tensors are torch
tensors, CuPy only on the GPU path.
"""

__version__ = "0.1.0"
