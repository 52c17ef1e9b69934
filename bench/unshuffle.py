"""Byte un-shuffle, the last step of restoring a shuffled chunk: ``python -m bench.unshuffle``.

One core, 4 MiB chunks, GB/s of output: the plane-by-plane strided copy (``kernels.numpy_shuffle``
before), the integer join snapd now uses for 2-byte elements, and, when ``blosc2`` is installed,
whether it offers a shuffle we could call (it does not: its Python API shuffles only inside its own
compressed frames, and at ``clevel=0`` it stores the bytes unshuffled, which this checks).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kernels.numpy_shuffle import shuffle, unshuffle_into

CHUNK = 4 << 20


def strided(planes: list[np.ndarray], itemsize: int, out: np.ndarray) -> None:
    elems = out.reshape(-1, itemsize)
    for p in range(itemsize):
        elems[:, p] = planes[p]


def rate(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return CHUNK * reps / (time.perf_counter() - t) / 1e9


def blosc2_note(raw: np.ndarray) -> str:
    try:
        import blosc2
    except ImportError:
        return "blosc2 not installed"
    frame = blosc2.compress2(raw, typesize=4, clevel=0, filters=[blosc2.Filter.SHUFFLE])
    stored = np.frombuffer(frame, np.uint8)[-raw.size:]
    kind = "unshuffled bytes" if np.array_equal(stored, raw) else "other bytes"
    names = [n for n in dir(blosc2) if "shuffle" in n.lower() and callable(getattr(blosc2, n))]
    return (f"blosc2 {blosc2.__version__}: clevel=0 with SHUFFLE stores {kind}; shuffle functions "
            f"exposed: {names or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    out = np.empty_like(raw)
    for itemsize in (2, 4, 8):
        planes = list(shuffle(raw, itemsize))
        before = rate(lambda p=planes, k=itemsize: strided(p, k, out), args.reps)
        now = rate(lambda p=planes, k=itemsize: unshuffle_into(p, k, out), args.reps)
        assert np.array_equal(out, raw)
        print(f"{itemsize}-byte elements: strided copy {before:.2f} GB/s, snapd now {now:.2f} GB/s",
              flush=True)
    print(blosc2_note(raw))


if __name__ == "__main__":
    main()
