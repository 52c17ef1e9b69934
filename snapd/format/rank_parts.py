"""What each tensor of a rank's state is to the global snapshot, and whether this rank stores it.

- A shard (a ``DTensor``'s local piece: flatten records its global shape and offsets, taken from
  torch) is stored by its rank; a shard replicated over mesh dimensions only by the rank at
  coordinate 0 of them (flatten decides: ``placement.write``).
- A tensor under one of the job's ``per_rank`` key paths (RNG state, a dataloader's position) is
  this rank's own: every rank stores its value, and a restore gives it back to the same rank.
- Any other tensor is replicated (the same on every rank, as DCP assumes of plain tensors): one
  rank stores it, picked by its key's hash so the bytes spread over the ranks' disks; every rank
  records its dtype and shape, so the commit catches ranks that disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from snapd.errors import InvalidArgument
from snapd.format.leaves import TensorLeaf
from snapd.format.tree import key_matches


@dataclass(frozen=True)
class Role:
    scope: str  # "shard", "replicated" or "rank"
    stored: bool
    global_shape: list[int] | None = None
    offsets: list[int] | None = None


def check_per_rank(per_rank: object) -> tuple[str, ...]:
    """``per_rank``: key paths (each selecting itself and what lies below it)."""
    if per_rank is None:
        return ()
    if isinstance(per_rank, str):
        per_rank = (per_rank,)
    if not isinstance(per_rank, (list, tuple)) or not all(isinstance(k, str) and k.strip(".")
                                                          for k in per_rank):
        raise InvalidArgument(f"per_rank must be key paths (str), like ('rng', 'loader'), got {per_rank!r}")
    return tuple(per_rank)


def owner(key: str, world_size: int) -> int:
    """The rank that stores replicated tensor ``key``."""
    return xxhash.xxh3_64_intdigest(key.encode()) % world_size


def roles(leaves: list[TensorLeaf], rank: int, world_size: int, per_rank: tuple[str, ...]) -> list[Role]:
    out = []
    for leaf in leaves:
        p = leaf.placement
        if any(key_matches(leaf.key, sel) for sel in per_rank):
            out.append(Role("rank", True))
        elif p is not None:
            out.append(Role("shard", p[2], list(p[0]), list(p[1])))
        else:
            out.append(Role("replicated", owner(leaf.key, world_size) == rank))
    return out
