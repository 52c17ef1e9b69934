"""Restore onto the device, timed, with the host memory each method takes on the way at its peak
(the process's resident set, sampled on a thread every few milliseconds while the load runs, less
what it was before): a restore may hold the whole state in host memory before it reaches the
GPU, or a window of it. For ``bench.gpu_bench``."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import torch

from bench.machine import Recorder
from bench.peers import TorchSave


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.grown``: bytes above the resident set at entry."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.grown = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self._base = self._top = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self._top = max(self._top, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._top = max(self._top, self._proc.memory_info().rss)
        self.grown = self._top - self._base


def restore(rec: Recorder, scen: str, method: str, load: Any, reps: int = 2, **extra: Any) -> None:
    """Seconds until ``load()``'s tensors are on the device (its copies and kernels finished), and
    the host memory it took on the way at its peak."""
    times, peaks = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        with PeakRss() as peak:
            t0 = time.perf_counter()
            out = load()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peaks.append(peak.grown / 2**20)
        del out
    rec.add(scen, method, "restore_to_gpu", times, **extra)
    rec.add(scen, method, "restore_host_peak", peaks, unit="MiB", **extra)


def peer_restore(rec: Recorder, scen: str, peer: Any, state: dict) -> None:
    if isinstance(peer, TorchSave):
        restore(rec, scen, "torch.load(map_location='cuda')",
                lambda: torch.load(peer.last, map_location="cuda", weights_only=True))
    else:
        import torch.distributed.checkpoint as dcp

        peer.pending.wait()
        restore(rec, scen, "DCP load (into the state)",
                lambda: dcp.load(state, checkpoint_id=str(peer.last), no_dist=True))
