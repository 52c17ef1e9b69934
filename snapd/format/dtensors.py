"""DTensors (FSDP2's ``fully_shard``, tensor parallelism): each is saved as its local shard, placed
in its global tensor by torch's own account (the chunk DCP would write for it), not re-derived here.
A shard replicated over mesh dimensions is written by the rank at coordinate 0 of them only.
torch is imported only when a state holds a DTensor."""

from __future__ import annotations

from typing import Any

from snapd.errors import UnsupportedValueError

MAX_DEPTH = 64  # (snapd.format.tree's)

Placement = tuple[tuple[int, ...], tuple[int, ...], bool]  # global shape, offsets, this rank writes it


def local_shard(key: str, obj: Any) -> tuple[Any, Placement]:
    """The local tensor of DTensor ``obj`` (at key path ``key``), and where it lies."""
    from torch.distributed.tensor import DTensor

    if not isinstance(obj, DTensor):
        raise UnsupportedValueError(f"{key}: a tensor subclass named DTensor that is not torch's "
                                    f"({type(obj).__module__}) cannot be saved")
    if any(p.is_partial() for p in obj.placements):
        raise UnsupportedValueError(f"{key}: a DTensor with a Partial placement holds unreduced values: "
                                    "redistribute it first (dt.redistribute(placements=[Replicate()]))")
    local = obj.to_local().detach()
    chunks = obj.__create_chunk_list__()
    if len(chunks) != 1 or list(chunks[0].sizes) != list(local.shape):
        raise UnsupportedValueError(f"{key}: this DTensor's local shard ({tuple(local.shape)}) is not one "
                                    f"box of its global tensor {tuple(obj.shape)} (torch's chunks: {chunks})")
    coord = obj.device_mesh.get_coordinate() or []
    write = all(c == 0 for c, p in zip(coord, obj.placements) if p.is_replicate())
    return local, (tuple(obj.shape), tuple(int(o) for o in chunks[0].offsets), write)


def has_dtensors(obj: Any, depth: int = 0) -> bool:
    """Whether a state holds a DTensor (asked of ``into=`` trees only: a restore's target)."""
    if type(obj).__name__ == "DTensor":
        return True
    if depth < MAX_DEPTH and isinstance(obj, dict):
        return any(has_dtensors(v, depth + 1) for v in obj.values())
    if depth < MAX_DEPTH and isinstance(obj, (list, tuple)):
        return any(has_dtensors(v, depth + 1) for v in obj)
    return False
