"""DTensors (FSDP2's ``fully_shard``, tensor parallelism): each is saved as its local shard, placed
in its global tensor by torch's own account (the chunk DCP would write for it), not re-derived here.
A shard replicated over mesh dimensions is written by the rank at coordinate 0 of them only.
torch is imported only when a state holds a DTensor."""

from __future__ import annotations

from typing import Any

from snapd.errors import UnsupportedValueError

MAX_DEPTH = 64  # (snapd.format.tree's)
MAX_PLACED = 4096  # DTensor layouts remembered (a model's parameters and optimizer states, with room)

Placement = tuple[tuple[int, ...], tuple[int, ...], bool]  # global shape, offsets, this rank writes it

# Where a DTensor's local shard lies is a function of its spec (mesh, placements, global shape,
# stride, dtype) and of this process's coordinate in that mesh object; torch computes it in about
# 80 us, which for a model's few hundred DTensors was most of a snapshot's stall (bench: 20 of 29 ms
# on 2 FSDP2 ranks). A training loop hands over the same DTensors step after step, so torch's answer
# is kept per (spec, mesh object): a new mesh (a restarted group) is a new key. Filled at run time.
_placed: dict[tuple[Any, int], tuple[Any, tuple[int, ...], Placement]] = {}


def local_shard(key: str, obj: Any) -> tuple[Any, Placement]:
    """The local tensor of DTensor ``obj`` (at key path ``key``), and where it lies."""
    from torch.distributed.tensor import DTensor

    if not isinstance(obj, DTensor):
        raise UnsupportedValueError(f"{key}: a tensor subclass named DTensor that is not torch's "
                                    f"({type(obj).__module__}) cannot be saved")
    local = getattr(obj, "_local_tensor", None)  # (to_local() without autograd's 25 us)
    local = (obj.to_local() if local is None else local).detach()
    mesh = obj.device_mesh
    memo_key = (obj._spec, id(mesh))
    known = _placed.get(memo_key)
    if known is None:
        known = (mesh, *_placement(key, obj, local))
        if len(_placed) >= MAX_PLACED:
            _placed.clear()
        _placed[memo_key] = known
    _, sizes, placement = known
    if sizes != tuple(local.shape):
        raise UnsupportedValueError(f"{key}: this DTensor's local shard {tuple(local.shape)} is not the "
                                    f"box torch places it in, {sizes}, of its global tensor "
                                    f"{tuple(obj.shape)}")
    return local, placement


def _placement(key: str, obj: Any, local: Any) -> tuple[tuple[int, ...], Placement]:
    """torch's own account of where ``obj``'s local shard lies: its sizes, and the placement."""
    if any(p.is_partial() for p in obj.placements):
        raise UnsupportedValueError(f"{key}: a DTensor with a Partial placement holds unreduced values: "
                                    "redistribute it first (dt.redistribute(placements=[Replicate()]))")
    chunks = obj.__create_chunk_list__()
    if len(chunks) != 1 or list(chunks[0].sizes) != list(local.shape):
        raise UnsupportedValueError(f"{key}: this DTensor's local shard {tuple(local.shape)} is not one "
                                    f"box of its global tensor {tuple(obj.shape)} (torch's chunks: {chunks})")
    coord = obj.device_mesh.get_coordinate() or []
    write = all(c == 0 for c, p in zip(coord, obj.placements) if p.is_replicate())
    return tuple(local.shape), (tuple(obj.shape), tuple(int(o) for o in chunks[0].offsets), write)


def has_dtensors(obj: Any, depth: int = 0) -> bool:
    """Whether a state holds a DTensor (asked of ``into=`` trees only: a restore's target)."""
    if type(obj).__name__ == "DTensor":
        return True
    if depth < MAX_DEPTH and isinstance(obj, dict):
        return any(has_dtensors(v, depth + 1) for v in obj.values())
    if depth < MAX_DEPTH and isinstance(obj, (list, tuple)):
        return any(has_dtensors(v, depth + 1) for v in obj)
    return False
