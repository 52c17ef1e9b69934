"""The few CUDA driver calls both sides of the GPU path make, through ctypes.

Shared by the client and the daemon and light on purpose: it loads
``libcuda.so.1`` (installed with the NVIDIA driver) on first use and
imports neither torch nor CuPy, so the client can export any framework's
device memory (torch, CuPy, ``__cuda_array_interface__``) the same way.

What it offers: where a device pointer's allocation starts (IPC handles
are per allocation, and allocators hand out sub-blocks of one), the
allocation's process-unique id (to cache handles safely: a freed and
re-made allocation at the same address gets a new id), whether legacy
CUDA IPC works for it (not for PyTorch's ``expandable_segments``), device
UUIDs (ordinals differ between containers), and interprocess events.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import uuid as uuidlib

log = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64
# CUpointer_attribute (cuda.h)
_CONTEXT, _BUFFER_ID, _ORDINAL, _IPC_CAPABLE, _RANGE_START, _RANGE_SIZE = 1, 7, 9, 10, 11, 12
_EVENT_DISABLE_TIMING, _EVENT_INTERPROCESS = 0x2, 0x4
_COMPUTE_MODE = 20  # CU_DEVICE_ATTRIBUTE_COMPUTE_MODE
COMPUTE_MODE_DEFAULT = 0
COMPUTE_MODES = {1: "exclusive-thread", 2: "prohibited", 3: "exclusive-process"}  # (CUcomputemode)


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


class _Handle(ctypes.Structure):  # CUipcMemHandle / CUipcEventHandle: 64 opaque bytes, passed by value
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]

    @classmethod
    def of(cls, handle: bytes) -> _Handle:
        if len(handle) != IPC_HANDLE_BYTES:
            raise CudaError(f"an IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        return cls.from_buffer_copy(handle)

    def raw(self) -> bytes:
        return bytes(self)  # all 64 bytes: handles contain NULs


_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def _driver() -> ctypes.CDLL:
    global _lib  # loaded once per process, on first use
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise CudaError(f"the CUDA driver (libcuda.so.1) cannot be loaded: {e}") from None
            _check(lib, lib.cuInit(0), "cuInit")
            _lib = lib
    return _lib


def _check(lib: ctypes.CDLL, rc: int, call: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        raise CudaError(f"{call} failed: {(name.value or b'error %d' % rc).decode()}")


def _call(name: str, *args: object) -> None:
    lib = _driver()
    _check(lib, getattr(lib, name)(*args), name)


def pid_namespace() -> int:
    """This process's pid namespace (an inode number): CUDA IPC needs both sides in the same one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def available() -> bool:
    try:
        _driver()
        return True
    except CudaError:
        return False


class Allocation:
    """Where a device pointer lives: its allocation's base, size, id, device and IPC capability."""

    __slots__ = ("base", "size", "buffer_id", "ordinal", "ipc_capable", "context")

    def __init__(self, ptr: int) -> None:
        base, size, buffer_id = ctypes.c_uint64(), ctypes.c_size_t(), ctypes.c_uint64()
        ordinal, capable, context = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p()
        slots = [(_RANGE_START, base), (_RANGE_SIZE, size), (_BUFFER_ID, buffer_id), (_ORDINAL, ordinal),
                 (_IPC_CAPABLE, capable), (_CONTEXT, context)]
        kinds = (ctypes.c_int * len(slots))(*[k for k, _ in slots])
        data = (ctypes.c_void_p
                * len(slots))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for _, v in slots])
        _call("cuPointerGetAttributes", ctypes.c_uint(len(slots)), kinds, data, ctypes.c_uint64(ptr))
        self.base, self.size, self.buffer_id = base.value, size.value, buffer_id.value
        self.ordinal, self.ipc_capable, self.context = ordinal.value, bool(capable.value), context.value or 0


_get_attribute: ctypes._CFuncPtr | None = None  # cuPointerGetAttribute, typed (bound on first use)


def buffer_id(ptr: int) -> int:
    """The process-unique id of the allocation holding ``ptr``: the client's per-snapshot check of
    each allocation it described, so it is called through a typed binding, not ``_call`` (no
    lock, no lookup by name, arguments converted in C): 0.8 us a call against 1.2 us on the
    2-core CI machine, against a stand-in driver (tests/unit/test_cuda_driver_calls.py)."""
    global _get_attribute
    fn = _get_attribute
    if fn is None:
        fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64)(
            ("cuPointerGetAttribute", _driver()))
        _get_attribute = fn
    v = ctypes.c_uint64()
    rc = fn(ctypes.byref(v), _BUFFER_ID, ptr)
    if rc:
        _check(_driver(), rc, "cuPointerGetAttribute")
    return v.value


class _Current:
    """Make ``context`` current for a few driver calls, then restore the caller's."""

    def __init__(self, context: int) -> None:
        self.context = context

    def __enter__(self) -> None:
        _call("cuCtxPushCurrent_v2", ctypes.c_void_p(self.context))

    def __exit__(self, *exc: object) -> None:
        _call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))


def mem_handle(alloc: Allocation) -> bytes:
    """The IPC handle of ``alloc`` (its whole allocation; the importer adds the offset)."""
    h = _Handle()
    with _Current(alloc.context):
        _call("cuIpcGetMemHandle", ctypes.byref(h), ctypes.c_uint64(alloc.base))
    return h.raw()


def device_uuid(ordinal: int) -> str:
    """``GPU-xxxxxxxx-...``, as nvidia-smi prints it: stable across containers' renumbering."""
    dev = ctypes.c_int()
    _call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
    raw = (ctypes.c_char * 16)()
    lib = _driver()
    fn = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    _check(lib, fn(raw, dev), "cuDeviceGetUuid")
    return "GPU-" + str(uuidlib.UUID(bytes=bytes(raw)))


def compute_mode(ordinal: int) -> int:
    """The device's compute mode (``COMPUTE_MODE_DEFAULT`` or a key of ``COMPUTE_MODES``), asked
    without making a context there."""
    dev, mode = ctypes.c_int(), ctypes.c_int()
    _call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
    _call("cuDeviceGetAttribute", ctypes.byref(mode), ctypes.c_int(_COMPUTE_MODE), dev)
    return mode.value


def primary_context(ordinal: int) -> int:
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
    _call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
    return ctx.value or 0


class IpcEvent:
    """An interprocess event made here: record it on a stream, send ``handle`` to the other side."""

    def __init__(self, context: int) -> None:
        self.context = context
        ev = ctypes.c_void_p()
        h = _Handle()
        with _Current(context):
            _call("cuEventCreate", ctypes.byref(ev),
                  ctypes.c_uint(_EVENT_DISABLE_TIMING | _EVENT_INTERPROCESS))
            _call("cuIpcGetEventHandle", ctypes.byref(h), ev)
        self.event = ev.value
        self.handle = h.raw()

    def record(self, stream: int) -> None:
        with _Current(self.context):
            _call("cuEventRecord", ctypes.c_void_p(self.event), ctypes.c_void_p(stream))

    def close(self) -> None:
        if self.event:
            with _Current(self.context):
                _call("cuEventDestroy_v2", ctypes.c_void_p(self.event))
            self.event = 0

    def done(self) -> bool:
        lib = _driver()
        with _Current(self.context):
            rc = lib.cuEventQuery(ctypes.c_void_p(self.event))
        if rc == 600:  # CUDA_ERROR_NOT_READY
            return False
        _check(lib, rc, "cuEventQuery")
        return True


class OpenedEvent:
    """The other side's interprocess event, opened here: make a stream wait for its last record."""

    def __init__(self, context: int, handle: bytes) -> None:
        self.context = context
        h = _Handle.of(handle)
        ev = ctypes.c_void_p()
        with _Current(context):
            _call("cuIpcOpenEventHandle", ctypes.byref(ev), h)
        self.event = ev.value

    def wait_on(self, stream: int) -> None:
        """The GPU work queued on ``stream`` after this call waits for the event; the CPU does not."""
        with _Current(self.context):
            _call("cuStreamWaitEvent", ctypes.c_void_p(stream), ctypes.c_void_p(self.event), ctypes.c_uint(0))

    def close(self) -> None:
        if self.event:
            with _Current(self.context):
                _call("cuEventDestroy_v2", ctypes.c_void_p(self.event))
            self.event = 0


def open_mem_handle(context: int, handle: bytes) -> int:
    """Map another process's allocation here; returns its base address in this process."""
    h = _Handle.of(handle)
    ptr = ctypes.c_uint64()
    with _Current(context):  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: the allocation may live on another device
        _call("cuIpcOpenMemHandle_v2", ctypes.byref(ptr), h, ctypes.c_uint(1))
    return ptr.value


def close_mem_handle(context: int, ptr: int) -> None:
    with _Current(context):
        _call("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))


def host_register(context: int, address: int, nbytes: int) -> None:
    """Page-lock host memory for fast device copies (portable: every context may use it).

    Through ctypes, so the GIL is released meanwhile: pinning takes seconds per
    10 GiB, and the daemon's server thread must keep answering.
    """
    with _Current(context):
        _call("cuMemHostRegister_v2", ctypes.c_void_p(address), ctypes.c_size_t(nbytes), ctypes.c_uint(1))


def copy_to_host(context: int, dst: int, src: int, nbytes: int, stream: int) -> None:
    """Copy ``nbytes`` of device memory at ``src`` to host memory at ``dst`` once the work queued on
    ``stream`` (the producer's: 0 none, 1 legacy default, 2 per-thread default, else a handle) is
    done. Blocking, GIL released: the fallback that stages a device array when CUDA IPC cannot
    work, for arrays neither torch nor CuPy can copy (anything known by __cuda_array_interface__)."""
    with _Current(context):
        if stream:
            _call("cuStreamSynchronize", ctypes.c_void_p(stream))
        _call("cuMemcpyDtoH_v2", ctypes.c_void_p(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes))


def host_unregister(context: int, address: int) -> None:
    with _Current(context):
        _call("cuMemHostUnregister", ctypes.c_void_p(address))
