"""Element types a snapshot can hold, by their on-disk names.

Bytes are always stored little-endian. NumPy and torch dtypes map to one
canonical name each; torch-only types (bfloat16, float8) map to NumPy through
``ml_dtypes`` when it is installed, and are otherwise only restorable as
torch tensors.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from snapd.errors import FormatError, UnsupportedValueError

# canonical name -> element size in bytes
ITEMSIZE: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4,
    "uint64": 8, "int64": 8, "float16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
}
_ML_DTYPES_ONLY = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def itemsize(name: str) -> int:
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r} (known: {', '.join(sorted(ITEMSIZE))})") from None


def numpy_name(dtype: np.dtype, key: str) -> str:
    """Canonical name of a NumPy dtype, or an error naming the key path."""
    name = dtype.name
    if name in ITEMSIZE and dtype.kind != "V" or name in _ML_DTYPES_ONLY:
        return name
    raise UnsupportedValueError(f"{key}: NumPy dtype {dtype} is not supported "
                                f"(supported: {', '.join(sorted(ITEMSIZE))})")


CAI_NAMES: dict[str, tuple[str, int]] = {}  # __cuda_array_interface__ typestr -> (name, itemsize), as met


def cai_name(typestr: str, key: str) -> tuple[str, int]:
    """The canonical name and element size of a ``__cuda_array_interface__`` typestr ("<f4"), or
    an error naming the key path. Cached: a snapshot asks it for every CUDA array, and NumPy's
    ``dtype.name`` alone costs ~4 us."""
    dtype = np.dtype(typestr)
    if dtype.byteorder == ">":  # (snapshots hold little-endian bytes; a device copy cannot swap them)
        raise UnsupportedValueError(f"{key}: a big-endian CUDA array ({typestr}) cannot be saved")
    out = CAI_NAMES[typestr] = (numpy_name(dtype, key), dtype.itemsize)
    return out


def numpy_dtype(name: str) -> np.dtype:
    """The little-endian NumPy dtype for ``name``; ml_dtypes for torch-only types."""
    itemsize(name)
    if name in _ML_DTYPES_ONLY:
        try:
            import ml_dtypes
        except ImportError:
            raise UnsupportedValueError(
                f"dtype {name} has no NumPy equivalent without the ml_dtypes package: "
                f"install ml_dtypes, or torch and load as torch tensors") from None
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name).newbyteorder("<")


def torch_module() -> Any | None:
    """torch if the process has already imported it, else None (never imports it)."""
    return sys.modules.get("torch")


TORCH_NAMES: dict[Any, str] = {}  # torch dtype -> name, filled as dtypes are met (str() costs ~1 us)


def torch_name(dtype: Any, key: str) -> str:
    name = TORCH_NAMES.get(dtype)
    if name is not None:
        return name
    name = str(dtype).removeprefix("torch.")
    if name in ITEMSIZE:
        TORCH_NAMES[dtype] = name
        return name
    raise UnsupportedValueError(f"{key}: torch dtype {dtype} is not supported "
                                f"(supported: {', '.join(sorted(ITEMSIZE))})")


def torch_dtype(name: str) -> Any:
    import torch  # only reached when the saved tensor was a torch tensor

    itemsize(name)
    dt = getattr(torch, name, None)
    if dt is None:
        raise UnsupportedValueError(f"dtype {name} is not available in torch {torch.__version__}")
    return dt


def check_torch_memory(key: str, obj: Any) -> None:
    """Refuse a torch tensor whose bytes are not plainly its own storage's: a wrapper subclass
    (its pointer is not the data its shape describes: reading through it crashed trainers), a
    nested tensor, or a subclass whose storage is smaller than its extent."""
    torch = torch_module()
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        if obj.is_nested:
            raise UnsupportedValueError(f"{key}: nested tensors are not supported (save each component "
                                        "tensor)")
        return
    name = type(obj).__name__  # (a DTensor is taken apart before this: snapd.format.leaves)
    try:
        storage = obj.untyped_storage()
        start = obj.storage_offset() * obj.element_size()
        ok = (obj.is_nested is False and storage.data_ptr() + start == obj.data_ptr()
              and start + obj.nbytes <= storage.nbytes())
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UnsupportedValueError(f"{key}: a torch tensor subclass {name} whose bytes are not a plain "
                                    "storage (a wrapper or nested tensor) is not supported: save a plain "
                                    "torch.Tensor")
