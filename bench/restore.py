"""Restore: full and partial (one sub-tree), from page cache and cold.

Each method saves the same state once; then each load is timed warm (every
method's first, on the pages its writer left in the page cache: a restart on the
same node) and cold (their pages dropped with posix_fadvise(DONTNEED), which
needs no root; clean pages go). Partial: the tensors under one prefix, read
the cheapest way each method offers (torch.load with mmap, safetensors'
safe_open, DCP load of a state dict holding only those keys, snapd keys=).
Every timed load ends by reading one byte of every page of what it returned:
safetensors (and torch.load with mmap) hand back tensors over a lazy mmap, and
a load that has not read the bytes has not restored them. snapd is measured as
the daemon stored the state (its codec choice), and stored raw (returned over
the mapped file, and read into memory) and shuffle-zstd; every snapd load checks
every chunk's checksum, which the others do not.
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
from snapd.format.saving import save_state


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

    def snapd_job(name: str, **kw: Any) -> dict[str, Callable[[], Any]]:
        return {"full": lambda: snapd_load(job_root, name, **kw),
                "partial": lambda: snapd_load(job_root, name, keys=prefix, **kw)}

    return {
        "torch.load": {"full": lambda: torch.load(paths["torch.save + fsync"]), "partial": torch_partial},
        "safetensors": {"full": lambda: load_file(str(paths["safetensors + fsync"])), "partial": st_partial},
        "DCP load": {"full": lambda: dcp_load(list(state)), "partial": lambda: dcp_load(keys)},
        "snapd": snapd_job(job),  # (the codec the daemon chose for this job)
        "snapd raw (mapped)": snapd_job("restore-raw"),
        "snapd raw (mapped, verify=False)": snapd_job("restore-raw", verify=False),
        "snapd raw (read, mmap=False)": snapd_job("restore-raw", mmap=False),
        "snapd shuffle-zstd": snapd_job("restore-zstd"),
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
        for name, codec in (("restore-raw", "raw"), ("restore-zstd", "shuffle-zstd")):  # codecs fixed
            save_state(job_root, name, state, step=1, codec=codec)
        files = {"torch.load": paths["torch.save + fsync"], "safetensors": paths["safetensors + fsync"],
                 "DCP load": paths["DCP save"], "snapd": job_root / "restore",
                 "snapd raw (mapped)": job_root / "restore-raw",
                 "snapd raw (mapped, verify=False)": job_root / "restore-raw",
                 "snapd raw (read, mmap=False)": job_root / "restore-raw",
                 "snapd shuffle-zstd": job_root / "restore-zstd"}
        part = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))
        # every method's warm loads first: each then finds its files' pages as their writer left
        # them (a load after a cold one finds the pages its faults read in, in smaller folios: 1.7-
        # 2.5x slower to map for safetensors and snapd alike), and the three loads of restore-raw
        # meet the same page cache
        loaders = _loaders(state, prefix, paths, job_root, "restore")
        for cache in ("warm", "cold"):
            for method, fns in loaders.items():
                for kind, fn in fns.items():
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
