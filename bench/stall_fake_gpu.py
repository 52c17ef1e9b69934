"""The GPU path's CPU stall by array count, without a GPU: ``python -m bench.stall_fake_gpu``.

The stall target of issue 4 (at most 2 ms whatever the size) is CPU time: flattening or
replaying the state, describing each device array, the messages, the daemon's reply. This runs
that whole path against the stand-in GPU of the integration tests (tests/integration/fake_cuda.py:
device memory is shared memory, the daemon's CuPy and driver calls are replaced, its launches run
the kernel's source built for the host with g++), for a state of arrays known by
``__cuda_array_interface__`` (CuPy's kind: torch CUDA tensors need a real GPU, ``bench.stall_scaling
--device cuda``). The driver calls being Python here, not ctypes, the figure is not the GPU's; the
rest of the path is snapd's own code. There is no peer to compare: torch.save and DCP take torch
tensors. Arrays of 16 KiB, all in one allocation (as an allocator packs small ones), a changing
step counter; each snapshot waited to durable before the next.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

import snapd.client as snapd
from bench.fake_gpu import TESTS, stand_in
from snapd.client.connection import probe


def measure(count: int, reps: int, work: Path, fake: types.ModuleType, lib: Path) -> list[float]:
    endpoint = f"ipc://{work}/s{count}.sock"
    log = open(work / f"daemon-{count}.log", "w")
    daemon = subprocess.Popen([sys.executable, str(TESTS / "integration" / "fake_cuda_daemon.py"), str(lib),
                               str(256 << 20), "1", "serve", "--root", str(work / "root"), "--endpoint",
                               endpoint,
                               "--backend", "cuda", "--codec", "raw", "--host-buffer-bytes", str(64 << 20)],
                              stdout=log, stderr=subprocess.STDOUT, cwd="/")
    arena = fake.Arena(Path("/dev/shm") / f"snapd-bench-fake-gpu-{os.getpid()}-{count}")
    try:
        while probe(endpoint, 0.2) is None:
            if daemon.poll() is not None:
                raise RuntimeError((work / f"daemon-{count}.log").read_text())
        fake.install_client(types.SimpleNamespace(setattr=setattr), [arena])
        bid, base = arena.alloc(count * 16384)
        arrays = {f"layers.{i}": fake.DeviceArray(arena, np.zeros(4096, np.float32),
                                                  within=(bid, base + i * 16384))
                  for i in range(count)}
        stalls = []
        with snapd.connect(f"fake{count}", endpoint=endpoint, spawn=False, keep_last=1) as c:
            for step in range(reps + 2):  # the first two define the layout and its memo
                p = c.snapshot({"model": arrays, "step": step}, step=step)
                stalls.append(p.stall_s)
                p.wait(60)
        return stalls[2:]
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
        arena.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="16,256,1024")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapd-stall-fake-gpu-") as tmp:
        work = Path(tmp)
        fake_cuda, lib = stand_in(work)
        print(f"{os.cpu_count()} cores; stall of snapshot() on the stand-in GPU path, ms")
        for count in (int(c) for c in args.counts.split(",")):
            t0 = time.perf_counter()
            s = sorted(x * 1e3 for x in measure(count, args.reps, work, fake_cuda, lib))
            print(f"{count:>6} arrays: median {statistics.median(s):.2f} (min {s[0]:.2f}, max {s[-1]:.2f}) "
                  f"over {len(s)} snapshots [{time.perf_counter() - t0:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
