"""``share()`` of DTensors: their local shards move into the shared region like plain tensors.

A DTensor's bytes are its local tensor (``_local_tensor``); rebinding that with ``set_`` puts them
in the region, and ``snapshot()`` then finds them there by address. FSDP2 (``fully_shard``) holds
each parameter's shard twice over one storage: the parameter's local tensor, which the optimizer
updates, is a view of a padded flat tensor (``FSDPParam._sharded_param_data``), which the
all-gather reads. Both must move together, onto one storage, or the all-gather would read bytes
the optimizer no longer updates. These are torch internals: where they are not laid out as
expected, ``share()`` refuses, naming the parameter, rather than move half of it. (A later
``load_state_dict(assign=True)`` replaces the tensors; ``snapshot()`` then copies them, as for
any tensor outside the region.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapd.errors import UnsupportedValueError
from snapd.format import dtypes


@dataclass
class Move:
    """One block of the region (``nbytes``) and how to move tensors into it (``into(block)``)."""

    nbytes: int
    into: Callable[[np.ndarray], None]


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def fsdp_params(objects: tuple[Any, ...]) -> dict[int, Any]:
    """The FSDP2 parameters of the modules among ``objects``, by the id of their sharded parameter
    (each module resharded first: between steps, FSDP2 registers the sharded parameters)."""
    torch = dtypes.torch_module()
    if torch is None:
        return {}
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    out: dict[int, Any] = {}
    for obj in objects:
        if not isinstance(obj, torch.nn.Module):
            continue
        for m in obj.modules():
            if not isinstance(m, FSDPModule):
                continue
            m.reshard()
            group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
            for p in getattr(group, "fsdp_params", None) or []:
                out[id(p.sharded_param)] = p
    return out


def move_of(name: str, t: Any, fsdp: dict[int, Any]) -> Move | None:
    """How to move DTensor ``t`` (named ``name`` in errors) into the region; None if empty."""
    local = getattr(t, "_local_tensor", None)
    if local is None or type(local) is not dtypes.torch_module().Tensor:
        raise UnsupportedValueError(f"share(): {name}: this DTensor's local tensor is not a plain tensor "
                                    "(a torch version share() does not know): snapshot it without share()")
    if local.device.type != "cpu" or local.numel() == 0:
        return None
    dtypes.check_torch_memory(f"share(): {name}", local)
    param = fsdp.get(id(t))
    if param is None:
        return Move(local.numel() * local.element_size(), lambda block: _rebind_alone(local, block))
    padded = getattr(param, "_sharded_param_data", None)
    if not _views_of(local, padded):
        raise UnsupportedValueError(f"share(): {name}: this FSDP2 parameter's shard is not laid out as "
                                    "share() knows it (a view of FSDP2's padded flat shard): snapshot "
                                    "the model without share()")
    return Move(padded.numel() * padded.element_size(), lambda block: _rebind_with(padded, local, block))


def _views_of(local: Any, padded: Any) -> bool:
    """Whether ``local`` is a contiguous stretch of the flat contiguous tensor ``padded``."""
    if type(padded) is not type(local) or padded.dtype != local.dtype or padded.dim() != 1 or \
            not padded.is_contiguous() or not local.is_contiguous():
        return False
    start = local.storage_offset() - padded.storage_offset()
    return padded.untyped_storage().data_ptr() == local.untyped_storage().data_ptr() and \
        0 <= start and start + local.numel() <= padded.numel()


def _block(block: np.ndarray, like: Any) -> Any:
    import torch

    return torch.from_numpy(block).view(like.dtype)[:like.numel()]


def _rebind_alone(local: Any, block: np.ndarray) -> None:
    """A DTensor's local tensor, alone over its storage: copied into ``block`` and rebound there."""
    import torch

    new = _block(block, local).view(local.shape)
    with torch.no_grad():
        new.copy_(local)
        local.set_(new.untyped_storage(), new.storage_offset(), local.shape, new.stride())


def _rebind_with(padded: Any, local: Any, block: np.ndarray) -> None:
    """FSDP2's padded flat shard and the parameter's view of it: copied into ``block`` and both
    rebound there, the view at the same place in it."""
    import torch

    new = _block(block, padded)
    start = local.storage_offset() - padded.storage_offset()
    with torch.no_grad():
        new.copy_(padded)
        storage, at = new.untyped_storage(), new.storage_offset()
        padded.set_(storage, at, padded.shape, padded.stride())
        local.set_(storage, at + start, local.shape, local.stride())
