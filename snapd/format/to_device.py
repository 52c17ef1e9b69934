"""Restoring onto a GPU: which tensors go there, and how their bytes get there.

Chunks are read and decompressed on CPU threads as for any restore, except
that a shuffled chunk is left as its byte planes; the tensor's bytes are
copied to the device in one transfer and unshuffled there by the CUDA kernel
(``snapd.kernels.segments``), which is far faster than NumPy's strided
unshuffle on the host. Without CuPy (a torch-only machine), or with a CuPy
that cannot run the kernel (its NVRTC missing, say: found at the first launch,
logged once), the planes are unshuffled on the host first. torch and CuPy are
imported only here, and only when a restore asks for a device.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from snapd.errors import FormatError, InvalidArgument
from snapd.format import dtypes
from snapd.format.manifest import TensorRecord

log = logging.getLogger(__name__)

_SHUFFLED = ("shuffle-lz4", "shuffle-zstd")
_kernel_failed: list[str] = []  # why the kernel could not run in this process (set once, at runtime)


def _is_cuda(device: Any) -> bool:
    return device is not None and str(device).split(":")[0] == "cuda"


def check_device(device: Any, torch_tensors: bool) -> None:
    """Refuse, in snapd's words, a CUDA ``device`` this process cannot use (torch's own
    AssertionError said "Torch not compiled with CUDA enabled" from deep inside a restore).
    ``torch_tensors``: the snapshot has some, so torch is imported to ask it (it would be anyway)."""
    if not _is_cuda(device):
        return
    try:
        torch = dtypes.torch_module()
        if torch is None and torch_tensors:
            import torch
        if torch is not None and torch.cuda.is_available():
            return
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return
    except Exception:  # no CuPy, no driver or no device
        pass
    raise InvalidArgument(f"device {device!r}: no CUDA device is usable in this process "
                          "(torch.cuda.is_available() "
                          "is False and CuPy finds none): load with device=None (the CPU), or where a GPU is")


def _cupy() -> Any | None:
    """CuPy, if it can unshuffle on a device here."""
    if _kernel_failed:
        return None
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # no CuPy, no driver or no device
        return None


def _on_gpu(cp: Any, device_index: int, segs: list, stream: Any = None) -> bool:
    """Run the unshuffle ``segs`` on the device; False (logged once) if the kernel cannot run in this
    process, so that the caller unshuffles on the host instead of failing the restore."""
    from snapd.kernels.cupy_backend import run_segments

    try:
        with cp.cuda.Device(device_index):
            run_segments(segs, stream)
        return True
    except Exception as e:  # (a compile or load failure comes before anything is launched)
        if not _kernel_failed:
            _kernel_failed.append(f"{type(e).__name__}: {e}")
            log.warning("the unshuffle kernel cannot run here (%s): restores unshuffle on the host",
                        _kernel_failed[0])
        return False


def goes_to_gpu(rec: TensorRecord, device: Any) -> bool:
    """Whether tensor ``rec`` is restored onto a GPU for this ``device`` argument."""
    if rec.kind == "torch":
        return _is_cuda(device) and dtypes.torch_module() is not None
    if rec.kind == "cupy":
        if device is not None and not _is_cuda(device):
            return False
        if _cupy() is None:
            log.warning("%s was saved as a CuPy array; CuPy or a CUDA device is missing, returning NumPy",
                        rec.key)
            return False
        return True
    return False  # NumPy arrays stay on the host, as map_location leaves them


def _shuffled(rec: TensorRecord) -> list[bool]:
    k = dtypes.itemsize(rec.dtype)
    flags = [k > 1 and c.codec in _SHUFFLED for c in rec.chunks]
    for c, f in zip(rec.chunks, flags):
        if f and c.raw % k:
            raise FormatError(f"{rec.key}: a shuffled chunk of {c.raw} bytes is not whole {k}-byte elements")
    return flags


def _segments(rec: TensorRecord, src: int, dst: int) -> list[tuple[int, int, int, int, int]]:
    """The segment kernel's work to unshuffle ``rec``'s decoded chunks at ``src`` into ``dst``."""
    from snapd.kernels.segments import COPY, UNSHUFFLE

    k = dtypes.itemsize(rec.dtype)
    segs, pos = [], 0
    for c, shuffled in zip(rec.chunks, _shuffled(rec)):
        segs.append((src + pos, dst + pos, c.raw // k, k, UNSHUFFLE) if shuffled else
                    (src + pos, dst + pos, c.raw, 1, COPY))
        pos += c.raw
    return segs


def _unshuffle_on_host(rec: TensorRecord, host: np.ndarray) -> np.ndarray:
    from snapd.kernels import unshuffle_into

    k, out, pos = dtypes.itemsize(rec.dtype), np.empty_like(host), 0
    for c, shuffled in zip(rec.chunks, _shuffled(rec)):
        part = host[pos:pos + c.raw]
        if shuffled:
            unshuffle_into(list(part.reshape(k, -1)), k, out[pos:pos + c.raw])
        else:
            out[pos:pos + c.raw] = part
        pos += c.raw
    return out


def _torch_stream(cp: Any, torch: Any, t: Any) -> Any:
    """torch's current stream on ``t``'s device as a CuPy stream: the unshuffle runs after the upload."""
    ptr = torch.cuda.current_stream(t.device).cuda_stream
    # ExternalStream is deprecated in CuPy 14 but still the one way by pointer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr)


def fills_on_gpu(rec: TensorRecord, target: Any) -> bool:
    """Whether ``into``'s ``target`` for ``rec`` is filled by unshuffling on its GPU: a contiguous CUDA
    torch tensor outside autograd (a ``state_dict()`` tensor) with shuffled chunks, and CuPy here.
    Any other target is filled from the host (``copy_``), unshuffled there."""
    torch = dtypes.torch_module()
    return torch is not None and isinstance(target, torch.Tensor) and target.is_cuda and bool(rec.nbytes) \
        and target.is_contiguous() and not target.requires_grad and any(_shuffled(rec)) \
        and _cupy() is not None


def upload_into(rec: TensorRecord, host: np.ndarray, target: Any) -> None:
    """Fill ``target`` (``fills_on_gpu``; ``rec``'s dtype and shape, checked by the caller) from the
    decoded chunks in ``host``: one upload of the planes, then the kernel unshuffles them straight
    into the target's memory, on torch's current stream."""
    import torch

    cp = _cupy()
    if cp is not None:
        staged = torch.from_numpy(host).to(target.device)
        index = target.device.index if target.device.index is not None else torch.cuda.current_device()
        if _on_gpu(cp, index, _segments(rec, staged.data_ptr(), target.data_ptr()),
                   _torch_stream(cp, torch, target)):
            # (``staged`` goes back to torch's allocator for its stream: reused only after the kernel ran)
            return
    plain = torch.from_numpy(_unshuffle_on_host(rec,
                                                host)).view(dtypes.torch_dtype(rec.dtype)).reshape(rec.shape)
    with torch.no_grad():
        target.copy_(plain)


def upload(rec: TensorRecord, host: np.ndarray, device: Any) -> Any:
    """The tensor whose decoded chunks (shuffled ones as planes) are in ``host``, on the GPU."""
    cp = _cupy()
    needs_unshuffle = any(_shuffled(rec))
    if needs_unshuffle and cp is None:
        host, needs_unshuffle = _unshuffle_on_host(rec, host), False
    if rec.kind == "torch":
        import torch

        dev = torch.device(device)
        # (a uint8 view of nothing cannot be re-viewed as another dtype)
        if not rec.nbytes or needs_unshuffle:
            out = torch.empty(rec.shape, dtype=dtypes.torch_dtype(rec.dtype), device=dev)
            if rec.nbytes:
                upload_into(rec, host, out)  # the planes up, unshuffled straight into the new tensor
            return out
        return torch.from_numpy(host).to(dev).view(dtypes.torch_dtype(rec.dtype)).reshape(rec.shape)
    index = int(str(device).split(":")[1]) if device is not None and ":" in str(device) else None
    with cp.cuda.Device(index if index is not None else cp.cuda.runtime.getDevice()):
        if not rec.nbytes:
            return cp.empty(rec.shape, dtype=dtypes.numpy_dtype(rec.dtype))
        staged = cp.asarray(host)
        if needs_unshuffle:
            out = cp.empty_like(staged)
            if _on_gpu(cp, out.device.id, _segments(rec, staged.data.ptr, out.data.ptr)):
                staged = out
            else:
                staged = cp.asarray(_unshuffle_on_host(rec, host))
        return staged.view(dtypes.numpy_dtype(rec.dtype)).reshape(rec.shape)
