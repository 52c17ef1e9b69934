"""Time to durable against the disk floor, as the state grows and as trainers are added.

Sizes: each method saves the same synthetic state (float32 tensors drawn
from N(0, 0.02), the statistics of trained weights) a few times; the floor is
a raw sequential write + fsync of exactly the bytes snapd stored, measured
right after each snapd save (virtual disks drift). Concurrency: 1, 2, 4
trainer processes snapshot into one daemon at once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import Recorder
from bench.peers import DcpAsync, Safetensors, Snapd, SnapdDaemon, TorchSave

MIB = 1 << 20


def synthetic(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    count = 16 if nbytes >= 64 * MIB else 4
    n = nbytes // 4 // count
    return {f"layer{i}.weight": torch.randn(n, generator=gen) * 0.02 for i in range(count)}


def disk_floor(nbytes: int, work: Path) -> float:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    t = time.perf_counter()
    with open(work / "floor.bin", "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - t
    (work / "floor.bin").unlink()
    return took


def run_sizes(sizes: list[int], work: Path, rec: Recorder, repeats: int) -> None:
    for nbytes in sizes:
        state = synthetic(nbytes)
        raw = sum(t.numel() * 4 for t in state.values())
        daemon = SnapdDaemon(work, raw + 16 * MIB)
        try:
            methods: list[Any] = [Snapd(daemon, f"size-{raw}"), TorchSave(work),
                                  DcpAsync(work, fastest=False), Safetensors(work)]
            for m in methods:
                m.start(state, 0).wait()  # warm-up
                stalls, durable, floors = [], [], []
                for i in range(1, repeats + 1):
                    t = time.perf_counter()
                    h = m.start(state, i)
                    stalls.append(time.perf_counter() - t)
                    stored = h.wait()
                    durable.append(time.perf_counter() - t)
                    if isinstance(m, Snapd):
                        floors.append(disk_floor(stored, work))
                extra = {"state_bytes": raw, "stored_bytes": stored}
                rec.add("durable", m.name, "stall", stalls, **extra)
                rec.add("durable", m.name, "time_to_durable", durable, **extra)
                rec.add("durable", m.name, "throughput", [raw / d for d in durable], unit="B/s", **extra)
                if floors:
                    rec.add("durable", "disk floor (snapd's stored bytes)", "time_to_durable", floors,
                            **extra)
                    rec.add("durable", m.name, "durable_over_floor",
                            [d / f for d, f in zip(durable, floors)], unit="x", codec=m.codec, **extra)
                m.close()
        finally:
            daemon.close()
        del state


def run_concurrency(counts: list[int], nbytes: int, work: Path, rec: Recorder, repeats: int) -> None:
    for n in counts:
        daemon = SnapdDaemon(work, nbytes + 16 * MIB, "--host-buffers", str(max(2, n)))
        try:
            procs = [subprocess.Popen([sys.executable, "-m", "bench.durable", "trainer", daemon.endpoint,
                                       str(nbytes), str(repeats), f"conc-{n}-{i}"], stdout=subprocess.PIPE,
                                      text=True,
                                      cwd=Path(__file__).resolve().parent.parent) for i in range(n)]
            results = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]
        finally:
            daemon.close()
        stalls = [s for r in results for s in r["stall"]]
        durable = [d for r in results for d in r["durable"]]
        extra = {"trainers": n, "state_bytes_each": nbytes}
        rec.add("concurrency", f"snapd plain x{n}", "stall", stalls, **extra)
        rec.add("concurrency", f"snapd plain x{n}", "time_to_durable", durable, **extra)


def trainer(endpoint: str, nbytes: int, repeats: int, job: str) -> None:
    """One trainer process of the concurrency scenario: prints its timings as JSON."""
    import snapd.client as snapd

    state = synthetic(nbytes, seed=zlib.crc32(job.encode()) % 1000)
    with snapd.connect(job, endpoint=endpoint, spawn=False, keep_last=1) as c:
        c.snapshot(state, step=0).wait()
        stalls, durable = [], []
        for i in range(1, repeats + 1):
            t = time.perf_counter()
            p = c.snapshot(state, step=i)
            stalls.append(time.perf_counter() - t)
            p.wait()
            durable.append(time.perf_counter() - t)
    print(json.dumps({"stall": stalls, "durable": durable, "median_stall": statistics.median(stalls)}))


if __name__ == "__main__" and sys.argv[1:2] == ["trainer"]:
    trainer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
