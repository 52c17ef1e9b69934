"""The daemon's GPU-thread work before a snapshot's device copies start, without a GPU:
``python -m bench.gpu_prep_fake [--counts 16,256,1024]``.

Between the trainer's ``snapshot()`` and the first device->host copy, the copier's thread plans
the windows and kernel launches for the snapshot's tensors; the trainer's next ``fence()`` may
wait on that. This times ``GpuCopier._enqueue`` on the integration tests' stand-in GPU
(tests/integration/fake_cuda.py) with the kernel launches stubbed out (the copies into host
memory still happen, as memmove): planning every snapshot (a new layout) against running the plan
kept with the layout (every replayed snapshot). 16 KiB float32 tensors in one allocation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from bench.fake_gpu import stand_in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="16,256,1024")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import zmq

    with tempfile.TemporaryDirectory(prefix="snapd-gpu-prep-") as tmp:
        fake_cuda, lib = stand_in(Path(tmp))
        fake_cuda.install_daemon(str(lib), 256 << 20, 1)  # this process: a stand-in daemon's CuPy and driver
        backend = sys.modules["snapd.kernels.cupy_backend"]
        backend.run_launches = lambda prepared, stream=None: None  # the Python around the launches only
        from snapd.daemon.gpu_copy import GpuCopier
        from snapd.format.leaves import TensorLeaf

        copier = GpuCopier(zmq.Context.instance(), 4 << 20, lambda *a, **k: {})
        print(f"{os.cpu_count()} cores; GPU-thread work before the copies start, ms (median of {args.reps})")
        for n in (int(c) for c in args.counts.split(",")):
            arena = fake_cuda.Arena(Path("/dev/shm") / f"snapd-gpu-prep-{os.getpid()}-{n}")
            try:
                _, base = arena.alloc(n * 16384)
                handle = fake_cuda.handle(arena.path, base - arena.base, n * 16384).hex()
                host = np.zeros(n * 16384, np.uint8)
                items = [(TensorLeaf(f"t{i}", "cupy", "float32", (4096,), host[i * 16384:(i + 1) * 16384]),
                          {"dev": fake_cuda.uuid(0), "handle": handle, "offset": i * 16384,
                           "size": n * 16384})
                         for i in range(n)]
                task = types.SimpleNamespace(peer=f"p{n}".encode(), job="prep", step=1)
                row = []
                for shuffle in (False, True):
                    for plans in (None, {}):
                        times = []
                        for _ in range(args.reps + 2):
                            t0 = time.perf_counter()
                            copier._enqueue(task, items, {}, host, shuffle, plans)
                            times.append(time.perf_counter() - t0)
                        row.append(statistics.median(times[2:]) * 1e3)
                print(f"{n:>6} tensors: plain {row[0]:.2f} planned each time, {row[1]:.2f} kept; "
                      f"shuffled {row[2]:.2f} planned each time, {row[3]:.2f} kept", flush=True)
            finally:
                arena.close()


if __name__ == "__main__":
    main()
