"""Restore: full and partial (one sub-tree), from page cache and cold.

Each method saves the same state once; then each load is timed warm (files
just read) and cold (their pages dropped with posix_fadvise(DONTNEED), which
needs no root; clean pages go). Partial: the tensors under one prefix, read
the cheapest way each method offers (torch.load with mmap, safetensors'
safe_open, DCP load of a state dict holding only those keys, snapd keys=).
Every timed load ends by reading one byte of every page of what it returned:
safetensors (and torch.load with mmap) hand back tensors over a lazy mmap, and
a load that has not read the bytes has not restored them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.machine import Recorder
from bench.peers import DcpSave, Safetensors, Snapd, SnapdDaemon, TorchSave
from snapd.client.local import load as snapd_load


def drop_cache(path: Path) -> None:
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch(obj: Any) -> int:
    """Read one byte per 4 KiB page of every tensor in ``obj`` (what a training step would fault in)."""
    if isinstance(obj, dict):
        return sum(touch(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(touch(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return int(obj.contiguous().reshape(-1).view(torch.uint8)[::4096].sum()) if obj.numel() else 0
    if isinstance(obj, np.ndarray):
        return int(np.ascontiguousarray(obj).reshape(-1).view(np.uint8)[::4096].sum()) if obj.size else 0
    return 0


def _loaders(state: dict, prefix: str, paths: dict[str, Path], job_root: Path, job: str
             ) -> dict[str, dict[str, Callable[[], Any]]]:
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from safetensors.torch import load_file

    keys = [k for k in state if k.startswith(prefix)]

    def dcp_load(only: list[str]) -> dict:
        target = {k: torch.empty_like(state[k]) for k in only}
        dcp.load(target, checkpoint_id=str(paths["DCP save"]), no_dist=True)
        return target

    def st_partial() -> dict:
        with safe_open(str(paths["safetensors + fsync"]), "pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    def torch_partial() -> dict:
        whole = torch.load(paths["torch.save + fsync"], mmap=True)
        return {k: whole[k].clone() for k in keys}

    return {
        "torch.load": {"full": lambda: torch.load(paths["torch.save + fsync"]), "partial": torch_partial},
        "safetensors": {"full": lambda: load_file(str(paths["safetensors + fsync"])), "partial": st_partial},
        "DCP load": {"full": lambda: dcp_load(list(state)), "partial": lambda: dcp_load(keys)},
        "snapd": {"full": lambda: snapd_load(job_root, job),
                  "partial": lambda: snapd_load(job_root, job, keys=prefix)},
    }


def run(state: dict, prefix: str, work: Path, rec: Recorder, repeats: int) -> None:
    raw = sum(t.numel() * t.element_size() for t in state.values())
    daemon = SnapdDaemon(work, raw + (16 << 20))
    paths: dict[str, Path] = {}
    try:
        s = Snapd(daemon, "restore")
        s.start(state, 1).wait()
        s.close()
        for peer in (TorchSave(work), Safetensors(work), DcpSave(work)):
            peer.start(state, 1).wait()
            paths[peer.name] = peer.last
        job_root = daemon.root
        files = {"torch.load": paths["torch.save + fsync"], "safetensors": paths["safetensors + fsync"],
                 "DCP load": paths["DCP save"], "snapd": job_root / "restore"}
        part = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))
        for method, fns in _loaders(state, prefix, paths, job_root, "restore").items():
            for kind, fn in fns.items():
                for cache in ("warm", "cold"):
                    times = []
                    fn()  # the first read also warms the page cache
                    for _ in range(repeats):
                        if cache == "cold":
                            drop_cache(files[method])
                        t = time.perf_counter()
                        touch(fn())
                        times.append(time.perf_counter() - t)
                    rec.add("restore", method, f"{kind}_{cache}", times, state_bytes=raw,
                            read_bytes=raw if kind == "full" else part)
    finally:
        daemon.close()
