"""A stand-in GPU for the GPU path's logic where there is no GPU (CI).

"Device memory" is an arena in /dev/shm that the trainer (this test process) and the daemon
(a subprocess started through ``fake_cuda_daemon.py``) both map. The trainer's arrays there
expose ``__cuda_array_interface__``, as CuPy's do; an IPC handle names the arena file and the
allocation's place in it, so the daemon's ``open_mem_handle`` maps the very bytes the trainer
wrote. In the daemon, CuPy is replaced by a module whose copies are ``memmove`` and whose kernel
launches run the real kernel source built for the host (tests/kernel_host). Everything of snapd
above the driver and CuPy is the real code: the client's export and cache, the protocol, the
daemon's handle cache, window plan, staging, preshuffled encoding, events, errors.

What it cannot show: ordering on streams (every copy here is done when it is queued) and the
real driver's behaviour. tests/gpu covers those on a GPU.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import struct
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fake_cuda")

def uuid(ordinal: int) -> str:
    return f"GPU-00000000-0000-4000-8000-00000000fa{ordinal:02x}"
BAD_ARENA = "/dev/shm/snapd-fake-gpu-none"  # a handle naming it cannot be opened
_MAGIC = b"FAKE"


class Arena:
    """Device memory: a shared file, handed out in allocations (each with its own id, as the
    driver's buffer ids are unique for the life of a process)."""

    _ids = itertools.count(1)

    def __init__(self, path: Path, size: int = 64 << 20, ordinal: int = 0) -> None:
        self.path, self.ordinal = str(path), ordinal
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.view = np.frombuffer(self.mm, np.uint8)
        self.base = self.view.ctypes.data
        self.next = 0
        self.live: dict[int, tuple[int, int]] = {}  # allocation id -> (address, size)

    def alloc(self, nbytes: int) -> tuple[int, int]:
        """A new allocation of ``nbytes``: (its id, its address); 512-aligned like cudaMalloc's."""
        at = self.next + -self.next % 512
        if at + nbytes > self.view.size:
            raise MemoryError("fake device memory exhausted")
        self.next = at + max(nbytes, 1)
        bid = next(self._ids)
        self.live[bid] = (self.base + at, nbytes)
        return bid, self.base + at

    def free(self, bid: int) -> None:
        del self.live[bid]

    def find(self, ptr: int) -> tuple[int, int, int]:
        for bid, (base, size) in self.live.items():
            if base <= ptr < base + max(size, 1):
                return bid, base, size
        from snapd.cuda_driver import CudaError

        raise CudaError(f"cuPointerGetAttribute failed: no fake allocation at {ptr:#x}")

    def close(self) -> None:
        del self.view
        self.mm.close()
        os.unlink(self.path)


class DeviceArray:
    """What a CuPy array looks like to snapd: ``__cuda_array_interface__`` over arena memory,
    several of them in one allocation when ``within`` names it (allocators hand out sub-blocks)."""

    def __init__(self, arena: Arena, values: np.ndarray, within: tuple[int, int] | None = None) -> None:
        values = np.ascontiguousarray(values)
        if within is None:
            self.allocation, self.ptr = arena.alloc(values.nbytes)
        else:
            self.allocation, self.ptr = within
        self.arena, self.shape, self.dtype = arena, values.shape, values.dtype
        self.host()[...] = values

    def host(self) -> np.ndarray:
        """The array's bytes, as the trainer's kernels would change them."""
        at = self.ptr - self.arena.base
        n = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        return self.arena.view[at:at + n].view(self.dtype).reshape(self.shape)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": 1}


def handle(path: str, offset: int, size: int) -> bytes:
    name = path.encode()
    return (_MAGIC + struct.pack("<QQ", offset, size) + name).ljust(64, b"\0")


class _Event:
    def __init__(self, context: int, handle: bytes | None = None) -> None:
        self.context, self.handle, self.event = context, handle or os.urandom(64), 1

    def record(self, stream: int) -> None:  # every copy is done once queued: nothing to wait for
        pass

    def wait_on(self, stream: int) -> None:
        pass

    def done(self) -> bool:
        return True

    def close(self) -> None:
        self.event = 0


def install_client(monkeypatch: Any, arenas: list[Arena], bad_handles: set[int] | None = None) -> None:
    """The trainer's driver calls (snapd/cuda_driver.py) over ``arenas`` (one a device, by ordinal);
    the allocations whose ids are in ``bad_handles`` export a handle the daemon cannot open."""
    from snapd import cuda_driver

    def where(ptr: int) -> tuple[Arena, int, int, int]:
        for arena in arenas:
            if arena.base <= ptr < arena.base + arena.view.size:
                return (arena, *arena.find(ptr))
        return (arenas[0], *arenas[0].find(ptr))  # (raises, naming the address)

    def allocation(ptr: int) -> Any:
        arena, bid, base, size = where(ptr)
        return types.SimpleNamespace(base=base, size=size, buffer_id=bid, ordinal=arena.ordinal,
                                     ipc_capable=True, context=1 + arena.ordinal)

    def mem_handle(alloc: Any) -> bytes:
        if bad_handles and alloc.buffer_id in bad_handles:
            return handle(BAD_ARENA, 0, alloc.size)
        arena = where(alloc.base)[0]
        return handle(arena.path, alloc.base - arena.base, alloc.size)

    monkeypatch.setattr(cuda_driver, "Allocation", allocation)
    monkeypatch.setattr(cuda_driver, "buffer_id", lambda ptr: where(ptr)[1])
    monkeypatch.setattr(cuda_driver, "device_uuid", uuid)
    monkeypatch.setattr(cuda_driver, "mem_handle", mem_handle)
    monkeypatch.setattr(cuda_driver, "host_register", lambda context, address, nbytes: None)
    monkeypatch.setattr(cuda_driver, "host_unregister", lambda context, address: None)
    # (the arenas are mapped here: a device->host copy is a memmove, once the address is checked)
    monkeypatch.setattr(cuda_driver, "copy_to_host",
                        lambda context, dst, src, n, stream: where(src) and ctypes.memmove(dst, src, n))
    monkeypatch.setattr(cuda_driver, "IpcEvent", lambda context: _Event(context))
    monkeypatch.setattr(cuda_driver, "OpenedEvent", _Event)


# -- the daemon's side --------------------------------------------------------------------------

class _Daemon:
    """The daemon's view of the arenas: files mapped on first use, handles counted as the driver
    does (a handle opened again in the same context returns the same address, one reference
    more; each close takes one away, and closing what is not open is an error), each in the log."""

    def __init__(self) -> None:
        self.maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        self.open: dict[int, int] = {}  # mapped address handed out -> its references

    def open_mem_handle(self, context: int, raw: bytes) -> int:
        from snapd.cuda_driver import CudaError

        if raw[:4] != _MAGIC:
            raise CudaError("cuIpcOpenMemHandle_v2 failed: CUDA_ERROR_INVALID_VALUE")
        offset, size = struct.unpack("<QQ", raw[4:20])
        path = raw[20:].rstrip(b"\0").decode()
        if path not in self.maps:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                raise CudaError("cuIpcOpenMemHandle_v2 failed: CUDA_ERROR_INVALID_HANDLE") from None
            try:
                mm = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            self.maps[path] = (mm, np.frombuffer(mm, np.uint8))
        address = self.maps[path][1].ctypes.data + offset
        self.open[address] = self.open.get(address, 0) + 1
        log.info("fake cuda: opened a handle (%d open)", sum(self.open.values()))
        return address

    def close_mem_handle(self, context: int, ptr: int) -> None:
        from snapd.cuda_driver import CudaError

        if not self.open.get(ptr):
            log.error("fake cuda: closed a handle that is not open (%#x)", ptr)
            raise CudaError("cuIpcCloseMemHandle failed: CUDA_ERROR_INVALID_VALUE")
        self.open[ptr] -= 1
        log.info("fake cuda: closed a handle (%d open)", sum(self.open.values()))


class _Buffer:
    def __init__(self, n: int) -> None:
        self.array = np.zeros(n, np.uint8)
        self.data = types.SimpleNamespace(ptr=self.array.ctypes.data)


class _Device:
    def __init__(self, ordinal: int = 0) -> None:
        self.ordinal = ordinal

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        self.ptr = 0x5

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Mark:
    def __init__(self, block: bool = False, disable_timing: bool = False) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _FailingStream(_Stream):
    def synchronize(self) -> None:
        _failing("sync")()


class _FailingMark(_Mark):
    def synchronize(self) -> None:
        _failing("sync")()


def _memcpy(dst: int, src: int, n: int, kind: int, stream: int) -> None:
    ctypes.memmove(dst, src, n)


def _failing(what: str) -> Any:
    """A stand-in call that fails as the real one does where CUDA IPC or the device path is broken."""
    from snapd.cuda_driver import CudaError

    def fail(*args: Any) -> None:
        if what == "open":  # (a sandbox or driver that will not map another process's memory)
            raise CudaError("cuIpcOpenMemHandle_v2 failed: CUDA_ERROR_NOT_SUPPORTED")
        if what == "context":  # (the trainer has filled the device's memory)
            raise CudaError("cuDevicePrimaryCtxRetain failed: CUDA_ERROR_OUT_OF_MEMORY")
        raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
    return fail


def install_daemon(kernel_lib: str, staging_bytes: int, devices: int = 1) -> None:
    """Replace CuPy, the CUDA backend's launches and the driver calls in this (daemon) process, with
    ``devices`` devices; the GPU copier's staging buffers and windows become ``staging_bytes``.
    ``$SNAPD_FAKE_CUDA_FAIL``: ``open``, no IPC handle opens; ``copy``, every device->host copy fails;
    ``context``, no device gets a context; ``sync``, every stream and event synchronize fails.
    ``$SNAPD_FAKE_CUDA_MODES``: each device's compute mode
    (``0,3``: device 1 exclusive-process). Each device made (its context) is logged."""
    from snapd import cuda_driver
    from snapd.daemon import gpu_windows

    fail = os.environ.get("SNAPD_FAKE_CUDA_FAIL", "")
    modes = [int(m) for m in os.environ.get("SNAPD_FAKE_CUDA_MODES", "").split(",") if m]

    def primary_context(ordinal: int) -> int:
        if fail == "context":
            _failing("context")()
        log.info("fake cuda: a context on device %d", ordinal)
        return 1 + ordinal

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel_host"))
    from host_kernel import HostKernel

    kernel = HostKernel(Path(kernel_lib))
    runtime = types.SimpleNamespace(getDeviceCount=lambda: devices, getDevice=lambda: 0,
                                    memcpyAsync=_failing("copy") if fail == "copy" else _memcpy)
    sync_fails = fail == "sync"
    cuda = types.SimpleNamespace(runtime=runtime, Device=_Device,
                                 Stream=_FailingStream if sync_fails else _Stream,
                                 Event=_FailingMark if sync_fails else _Mark,
                                 get_current_stream=lambda: _Stream())
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0 (tests/integration/fake_cuda.py)"
    cupy.cuda, cupy.uint8 = cuda, np.uint8
    cupy.empty = lambda n, dtype=None: _Buffer(int(n))
    sys.modules["cupy"] = cupy

    backend = types.ModuleType("snapd.kernels.cupy_backend")  # the launches, through the host build

    class CupyBackend:
        name = "cuda"
    backend.CupyBackend = CupyBackend
    backend.run_segments = lambda segs, stream=None, max_blocks=None: kernel.run(segs)
    backend.run_launches = lambda prepared, stream=None: kernel.run_launches(prepared)
    sys.modules["snapd.kernels.cupy_backend"] = backend

    gpu_windows.STAGING_BYTES = staging_bytes
    gpu_windows.plan.__defaults__ = (staging_bytes, gpu_windows.PIN_PIECE)
    handles = _Daemon()
    for name, fn in [("open_mem_handle", _failing("open") if fail == "open" else handles.open_mem_handle),
                     ("close_mem_handle", handles.close_mem_handle),
                     ("primary_context", primary_context), ("device_uuid", uuid),
                     ("compute_mode", lambda ordinal: modes[ordinal] if ordinal < len(modes) else 0),
                     ("host_register", lambda context, address, nbytes: None),
                     ("host_unregister", lambda context, address: None),
                     ("IpcEvent", lambda context: _Event(context)), ("OpenedEvent", _Event)]:
        setattr(cuda_driver, name, fn)
