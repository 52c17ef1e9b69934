"""The registered path: tensors that live in shared memory the daemon can read.

``Client.share(model, optimizer, state...)`` moves the storage of the given
tensors into one region (a file under /dev/shm, created by the client, read
by the daemon) once: torch tensors are rebound in place with ``set_``, so
the module's parameters and the optimizer's state now live there; NumPy
arrays inside dicts and lists are replaced by region-backed arrays in their
containers. A later ``snapshot()`` sends only descriptors for such tensors;
the daemon copies them while the next forward/backward runs, and only the
next mutation waits for that copy (``Pending.wait_copied()``, ``guard``).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from snapd.client import shared_dtensors
from snapd.format import dtypes
from snapd.format.dtypes import check_torch_memory

log = logging.getLogger(__name__)

ALIGN = 64


class SharedRegion:
    """One client-owned shared-memory file holding the registered tensors."""

    def __init__(self, nbytes: int, shm_dir: Path = Path("/dev/shm")) -> None:
        self.path = shm_dir / f"snapd-client-{os.getpid()}-{secrets.token_hex(4)}"
        self.size = max(nbytes, ALIGN)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # held while this process lives: a daemon in another pid namespace cannot tell by the pid
            # in the name that it is alive, and must not take the file for a dead trainer's
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self.view = np.frombuffer(self.mm, dtype=np.uint8)
        self.base = self.view.ctypes.data
        self.used = 0
        self.id: int | None = None  # the daemon's id for it, once registered

    def allow(self, uid: int) -> None:
        """Let the daemon's uid read this region (nothing to do when it is ours or root)."""
        if uid in (os.geteuid(), 0):
            return
        from snapd import posix_acl
        from snapd.errors import PermissionDenied

        try:
            posix_acl.grant(self.path, {uid: posix_acl.R})
        except OSError as e:
            raise PermissionDenied(f"cannot let the daemon (uid {uid}) read {self.path}: {e.strerror}; "
                                   "snapshot without share() instead") from None

    def slot(self, nbytes: int) -> tuple[int, np.ndarray]:
        self.used += -self.used % ALIGN
        off = self.used
        if off + nbytes > self.size:
            raise ValueError(f"region of {self.size} bytes is full")
        self.used += nbytes
        return off, self.view[off:off + nbytes]

    def offset_of(self, ptr: int, nbytes: int) -> int | None:
        """Where ``nbytes`` contiguous bytes at address ``ptr`` lie in this region, if they do."""
        if self.base <= ptr and ptr + nbytes <= self.base + self.size:
            return ptr - self.base
        return None

    def close(self) -> None:
        self.path.unlink(missing_ok=True)  # the mapping stays valid for tensors still using it
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _tensors(obj: Any) -> list[Any]:
    """Every CPU tensor/array reachable from ``obj`` (modules, optimizers, trees)."""
    torch = dtypes.torch_module()
    if torch is not None:
        if isinstance(obj, torch.nn.Module):
            return [*obj.parameters(), *obj.buffers()]
        if isinstance(obj, torch.optim.Optimizer):
            out = [t for s in obj.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            if not out:
                log.warning("optimizer has no state yet (it is created by the first step): share it after "
                            "one step")
            return out
        if isinstance(obj, torch.Tensor):
            return [obj]
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _nbytes(t: Any) -> int:
    return t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def share(objects: tuple[Any, ...]) -> SharedRegion:
    """Move every tensor of ``objects`` into one new region; return the region."""
    seen: dict[int, Any] = {}
    dtensors: dict[int, shared_dtensors.Move | None] = {}
    fsdp = shared_dtensors.fsdp_params(objects)
    for obj in objects:
        for t in _tensors(obj):
            if shared_dtensors.is_dtensor(t):
                if id(t) not in dtensors:
                    dtensors[id(t)] = shared_dtensors.move_of(f"a DTensor of shape {tuple(t.shape)}", t, fsdp)
                continue
            if not isinstance(t, np.ndarray):
                check_torch_memory(f"share(): {type(t).__name__}", t)  # before reading through its pointer
                if t.device.type != "cpu":
                    continue  # device tensors take the GPU path
            seen.setdefault(id(t), t)
    tensors = list(seen.values())
    moves = [m for m in dtensors.values() if m is not None]
    region = SharedRegion(sum(_nbytes(t) + ALIGN for t in tensors) + sum(m.nbytes + ALIGN for m in moves))
    for m in moves:
        m.into(region.slot(m.nbytes)[1])
    moved: dict[int, np.ndarray] = {}
    for t in tensors:
        off, dst = region.slot(_nbytes(t))
        if isinstance(t, np.ndarray):
            view = dst.view(t.dtype).reshape(t.shape) if t.size else np.empty(t.shape, t.dtype)
            np.copyto(view, t)
            moved[id(t)] = view
        else:
            import torch

            new = torch.from_numpy(dst).view(t.dtype).reshape(t.shape) if t.numel() else t
            with torch.no_grad():
                new.copy_(t)
                t.set_(new.untyped_storage(), new.storage_offset(), t.shape, new.stride())
    for obj in objects:  # NumPy arrays cannot be rebound: replace them in their containers
        _replace(obj, moved)
    log.info("registered %d tensors (%d MiB) in %s", len(tensors) + len(moves), region.used >> 20,
             region.path)
    return region


def _replace(obj: Any, moved: dict[int, np.ndarray]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if id(v) in moved:
                obj[k] = moved[id(v)]
            else:
                _replace(v, moved)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if id(v) in moved:
                obj[i] = moved[id(v)]
            else:
                _replace(v, moved)
    elif isinstance(obj, tuple):
        for v in obj:
            _replace(v, moved)
