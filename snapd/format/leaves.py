"""One tensor of a state as bytes ready to encode (``TensorLeaf``), made from what a state holds:
NumPy arrays and scalars, torch tensors (a DTensor's local shard), CuPy arrays and anything else
with ``__cuda_array_interface__`` or a CUDA DLPack capsule. ``snapd.format.tree`` walks the state
and asks for one leaf per tensor; anything these do not take is refused there, by key path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from snapd.errors import UnsupportedValueError
from snapd.format import dtypes
from snapd.format.dtensors import local_shard


class TensorLeaf:
    """One tensor of the state, as bytes ready to encode.

    ``data`` is a contiguous little-endian uint8 view that may alias the
    user's tensor. For torch tensors it is made on first use: the registered
    path only needs ``ptr`` and ``nbytes``, and skipping the view saves ~10 us
    a tensor on the trainer's side of snapshot().
    """

    __slots__ = ("key", "kind", "dtype", "shape", "source", "nbytes", "ptr", "_data", "on_device",
                 "preshuffled", "placement")

    def __init__(self, key: str, kind: str, dtype: str, shape: tuple[int, ...],
                 data: np.ndarray | None = None,
                 source: Any = None, nbytes: int | None = None, ptr: int | None = None,
                 on_device: bool = False) -> None:
        self.key, self.kind, self.dtype, self.shape = key, kind, dtype, shape
        self.source = source  # the object the bytes come from (kept alive while encoding)
        self._data = data
        self.nbytes = data.nbytes if data is not None else nbytes
        self.ptr = ptr
        self.on_device = on_device  # ptr is a CUDA device address (flatten(..., keep_device=True))
        self.preshuffled = False  # the daemon's GPU path left each chunk as byte planes (shuffle_chunks)
        # a DTensor's local shard: (global shape, offsets in it, whether this rank writes it)
        self.placement: tuple[tuple[int, ...], tuple[int, ...], bool] | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            import torch  # only torch leaves are made without their view

            flat = self.source.detach().reshape(-1)
            self._data = flat.view(torch.uint8).numpy() if self.nbytes else np.empty(0, np.uint8)
        return self._data


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, step = [], itemsize
    for d in reversed(shape):
        out.append(step)
        step *= d
    return tuple(reversed(out))


def _cuda_array_leaf(key: str, obj: Any, keep_device: bool, cai: dict | None = None) -> TensorLeaf | None:
    """CuPy arrays and anything else exposing ``__cuda_array_interface__`` (``cai``, when the caller
    has it: the property builds a dict each call) or a CUDA DLPack capsule. A snapshot pays this
    for every such array: ~2 us, cached dtype names and math.prod instead of NumPy's."""
    if cai is None:
        cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        dev = getattr(obj, "__dlpack_device__", None)
        if dev is None or not callable(dev) or dev()[0] != 2:  # kDLCUDA
            return None
        try:
            import cupy  # DLPack-only objects (JAX, ...) are viewed through CuPy, without a copy
        except ImportError:
            raise UnsupportedValueError(f"{key}: a CUDA DLPack tensor needs CuPy to be saved") from None
        return _cuda_array_leaf(key, cupy.from_dlpack(obj), keep_device)
    typestr = cai["typestr"]
    name, size = dtypes.CAI_NAMES.get(typestr) or dtypes.cai_name(typestr, key)
    shape = tuple(map(int, cai["shape"]))
    nbytes = math.prod(shape) * size
    strides = cai.get("strides")
    if strides is not None and nbytes and tuple(strides) != _c_strides(shape, size):
        if type(obj).__module__.split(".")[0] != "cupy":
            raise UnsupportedValueError(f"{key}: a non-contiguous CUDA array of type {type(obj).__name__} "
                                        "(make it contiguous first)")
        import cupy

        return _cuda_array_leaf(key, cupy.ascontiguousarray(obj), keep_device)
    if keep_device:
        return TensorLeaf(key, "cupy", name, shape, None, obj, nbytes, int(cai["data"][0]), on_device=True)
    import cupy  # in-process save: the bytes come to the host here

    host = cupy.asnumpy(cupy.asarray(obj)).reshape(-1).view(np.uint8)
    return TensorLeaf(key, "cupy", name, shape, host, host, host.nbytes, host.ctypes.data)


def array_leaf(key: str, obj: Any, keep_device: bool = False) -> TensorLeaf | None:
    """A NumPy or CUDA-array leaf, or None (torch tensors are taken by flatten before this)."""
    if isinstance(obj, (np.ndarray, np.generic)) and not isinstance(obj, (np.str_, np.bytes_, np.object_)):
        arr = np.asarray(obj)
        name = dtypes.numpy_name(arr.dtype, key)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        kind = "numpy_scalar" if isinstance(obj, np.generic) else "numpy"
        data = arr.reshape(-1).view(np.uint8)
        return TensorLeaf(key, kind, name, tuple(arr.shape), data, arr, data.nbytes, arr.ctypes.data)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None or hasattr(obj, "__dlpack_device__"):
        return _cuda_array_leaf(key, obj, keep_device, cai)
    return None


def torch_leaf(key: str, obj: Any, keep_device: bool, strided: Any) -> TensorLeaf:
    # The snapshot path runs this for every tensor of every snapshot, inside the trainer's stall:
    # each torch attribute costs 0.1-0.2 us, so only what can differ is asked (a quantized
    # tensor's dtype is refused by torch_name; conj and neg bits only exist on views), and
    # nothing is detached unless a new tensor is made (``TensorLeaf.data`` detaches when needed).
    if type(obj).__name__ == "DTensor":
        local, placement = local_shard(key, obj)
        leaf = torch_leaf(key, local, keep_device, strided)
        leaf.placement = placement
        return leaf
    dtypes.check_torch_memory(key, obj)
    if obj.layout is not strided:
        raise UnsupportedValueError(f"{key}: torch tensor with layout {obj.layout} is not supported "
                                    "(only dense tensors)")
    name = dtypes.torch_name(obj.dtype, key)
    t, on_device = obj, False
    if not obj.is_cpu:
        if obj.is_meta:
            raise UnsupportedValueError(f"{key}: a meta tensor has no data to save")
        on_device = keep_device and obj.is_cuda
        if not on_device:
            t = obj.detach().cpu()
    if t.is_neg() or name[0] == "c" and t.is_conj():  # ("complex*": no other dtype has a conj bit)
        t = t.detach().resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.detach().contiguous()  # on the device: a copy on the current stream, kept alive with the leaf
    return TensorLeaf(key, "torch", name, tuple(t.shape), None, t, t.nbytes, t.data_ptr(), on_device)
