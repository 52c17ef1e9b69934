"""The checkpointing methods a benchmark compares, behind one interface.

``start(state, step)`` blocks the trainer for as long as the method does
(its stall) and returns a handle; ``handle.wait()`` returns once the state
is durable (fsync'd), with the bytes stored. Every method saves the same
flat ``{key: torch.Tensor}`` state and keeps only its latest save on disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

import snapd.client as snapd
from snapd.client.connection import probe


def fsync_tree(path: Path) -> int:
    """fsync every file under ``path`` (and the directories); return the bytes."""
    total = 0
    paths = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        total += p.stat().st_size if p.is_file() else 0
    return total


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*")
                                                          if p.is_file())


class Done:
    def __init__(self, stored: int) -> None:
        self.stored = stored

    def wait(self) -> int:
        return self.stored


class Peer:
    """A method that writes files itself: ``_write`` saves ``state`` at ``path`` durably."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.dir = work / self.name.replace(" ", "_").replace("/", "_")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.last: Path | None = None

    def start(self, state: dict, step: int) -> Any:
        path = self.dir / f"step-{step}"
        handle = self._write(state, path)
        if self.last is not None and self.last != path:
            shutil.rmtree(self.last,
                          ignore_errors=True) if self.last.is_dir() else self.last.unlink(missing_ok=True)
        self.last = path
        return handle

    def _write(self, state: dict, path: Path) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class TorchSave(Peer):
    name = "torch.save + fsync"

    def _write(self, state: dict, path: Path) -> Done:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return Done(path.stat().st_size)


class Safetensors(Peer):
    name = "safetensors + fsync"

    def _write(self, state: dict, path: Path) -> Done:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return Done(fsync_tree(path))


class DcpSave(Peer):
    name = "DCP save"

    def _write(self, state: dict, path: Path) -> Done:
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=str(path), no_dist=True)
        return Done(fsync_tree(path))


class DcpAsync(Peer):
    """DCP ``async_save``: the stall lasts until staging completes (before that the trainer
    may not change its tensors); durable when the upload future resolves."""

    def __init__(self, work: Path, fastest: bool) -> None:
        self.fastest = fastest
        self.name = "DCP async_save (process, shm staging)" if fastest else "DCP async_save (default)"
        super().__init__(work)
        self.pending: Any = None
        if fastest:
            import torch.distributed as dist

            if not dist.is_initialized():  # the process executor needs a (one-rank) process group
                dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)

    def _write(self, state: dict, path: Path) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self.pending is not None:  # DCP allows one save in flight
            self.pending.wait()
        kw: dict[str, Any] = {}
        if self.fastest:
            kw = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS,
                  "async_stager": DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                               use_shared_memory=True, use_async_staging=True,
                                                               use_non_blocking_copy=False))}
        resp = dcp.async_save(state, checkpoint_id=str(path), no_dist=not self.fastest, **kw)
        if hasattr(resp, "staging_completion"):
            resp.staging_completion.result()
            fut = resp.upload_completion
        else:
            fut = resp
        self.pending = _Future(fut, path)
        return self.pending


class _Future:
    def __init__(self, fut: Any, path: Path) -> None:
        self.fut, self.path, self.stored = fut, path, None

    def wait(self) -> int:
        if self.stored is None:
            self.fut.result()
            self.stored = fsync_tree(self.path)  # DCP's writer fsyncs its files; this adds the directory
        return self.stored


class SnapdDaemon:
    """``snapd serve`` as a subprocess for one benchmark run. The benchmarks save the same state
    again and again: unless ``incremental``, the daemon writes every byte each time (as it does for
    a state that changed entirely), so that it is timed against the peers' full writes (sharing
    unchanged chunks is measured by bench/incremental.py)."""

    def __init__(self, work: Path, buffer_bytes: int, *extra: str, incremental: bool = False) -> None:
        if not incremental and "--incremental" not in extra:
            extra = (*extra, "--incremental", "off")
        self.root = work / "snapd-root"
        # (the socket in a short directory of its own: a Unix socket's path has at most 107 bytes,
        # and --dir, or pytest's temporary directories, can be deep)
        self.sockets = tempfile.mkdtemp(prefix="snapd-bench-")
        self.endpoint = f"ipc://{self.sockets}/snapd.sock"
        self.log = open(work / "snapd.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "snapd", "serve", "--root", str(self.root),
                                      "--endpoint", self.endpoint, "--host-buffer-bytes", str(buffer_bytes),
                                      *extra], stdout=self.log, stderr=self.log,
                                     cwd=work)
        while probe(self.endpoint, 0.2) is None:
            if self.proc.poll() is not None:
                raise RuntimeError((work / "snapd.log").read_text())

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()
        shutil.rmtree(self.sockets, ignore_errors=True)


class Snapd:
    """snapd through a daemon: ``plain`` copies into the daemon's shared memory; ``registered``
    (after ``share``) sends descriptors only and the daemon copies while training runs on."""

    def __init__(self, daemon: SnapdDaemon, job: str, registered: bool = False) -> None:
        self.name = f"snapd {'registered' if registered else 'plain'}"
        self.client = snapd.connect(job, endpoint=daemon.endpoint, spawn=False, keep_last=1)
        self.registered = registered
        self.codec = ""

    def share(self, *objects: Any) -> None:
        self.client.share(*objects)

    def start(self, state: dict, step: int) -> Any:
        pending = self.client.snapshot(state, step=step)
        return _SnapdHandle(self, pending)

    def close(self) -> None:
        self.client.close()


class _SnapdHandle:
    def __init__(self, owner: Snapd, pending: Any) -> None:
        self.owner, self.pending = owner, pending

    def wait(self) -> int:
        info = self.pending.wait()
        self.owner.codec = info.codec
        return info.stored_bytes


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out
