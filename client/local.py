"""In-process save and load, with no daemon: the synchronous path.

These write and read exactly the files the daemon writes, through the same
writer and reader, so a snapshot taken either way loads either way.
"""

from __future__ import annotations

import os
from typing import Any

from snapd.errors import InvalidArgument
from snapd.format import catalog
from snapd.format.catalog import SnapshotInfo
from snapd.client.ranks import detect
from snapd.client.ranks import run_id as find_run_id
from snapd.format.global_commit import DEFAULT_COMMIT_TIMEOUT_S
from snapd.format.global_reader import GlobalReader, open_snapshot
from snapd.format.rank_parts import check_per_rank
from snapd.format.dtensors import has_dtensors
from snapd.format.saving import DEFAULT_CODEC, save_state
from snapd.format.writer import Retention
from snapd.remote.tiers import locate, open_located, remote_url


def save(root: str | os.PathLike, job: str, state: Any, *, step: int, metrics: dict | None = None,
         keep_last: int | None = 5, keep_every_steps: int | None = None,
         best: tuple[str, str] | None = None, codec: str = DEFAULT_CODEC, per_rank: Any = None,
         rank: int | None = None, world_size: int | None = None, run_id: str | None = None,
         commit_timeout_s: float = DEFAULT_COMMIT_TIMEOUT_S, incremental: bool = True) -> SnapshotInfo:
    """Save ``state`` as snapshot ``step`` of ``job`` and return once it is durable.

    On several ranks (a ``torch.distributed`` group, torchrun's environment, or ``rank=`` and
    ``world_size=``), ``state`` is this rank's part (DTensors as their local shards) and the call
    returns once every rank's part is durable and the step committed as one global snapshot, or
    raises ``CommitFailed`` after ``commit_timeout_s``. ``per_rank``: key paths whose values differ
    by rank (RNG state, a dataloader's position), kept per rank and restored to the same rank;
    ``run_id``: client/ranks.py.

    ``keep_last`` most recent snapshots are kept (None keeps all), plus every
    snapshot whose step is a multiple of ``keep_every_steps``, plus the best
    by ``best=("val_loss", "min")``. Older ones are deleted only after this
    one is committed.

    ``incremental`` (default): chunks unchanged since the job's latest snapshot are not written
    again; that snapshot's data file is hard-linked instead (docs/FORMAT.md section 9).
    """
    retention = Retention(keep_last=keep_last, keep_every_steps=keep_every_steps, best=best)
    if best is not None and best[0] not in (metrics or {}):  # (a typo here would never mark a best)
        raise InvalidArgument(f"best=({best[0]!r}, {best[1]!r}) but metrics has no {best[0]!r} (it has: "
                              f"{', '.join(map(repr, metrics or {})) or 'none'}): pass it, or leave best out "
                              "of this save")
    ranks = detect(rank, world_size)
    done = save_state(root, job, state, step=step, metrics=metrics, retention=retention, codec=codec,
                      rank=ranks.rank, world_size=ranks.world_size, per_rank=check_per_rank(per_rank),
                      commit_timeout_s=commit_timeout_s, run=find_run_id(run_id, ranks),
                      incremental=incremental)
    return next((s for s in catalog.list_snapshots(root, job) if s.step == step),
                SnapshotInfo(step, done.path, done.entry.created_unix_s, done.entry.raw_bytes,
                             done.entry.stored_bytes, dict(done.entry.metrics)))


def load(root: str | os.PathLike, job: str, step: int | str | None = None, *,
         keys: list[str] | str | None = None, into: Any = None, device: Any = None,
         rank: int | None = None, remote: str | None = None, mmap: bool = True,
         verify: bool = True, fetch_part: Any = None) -> Any:
    """Load snapshot ``step`` (an int, ``"latest"`` by default, or ``"best"``).

    ``keys`` picks sub-trees by key path or dotted prefix (``"model."``) and
    reads only their chunks. ``into`` copies the values into an existing
    tree of tensors in place (every mismatch is reported before anything is
    written). ``device`` places torch tensors, like ``map_location`` (``"cuda:0"``:
    decompressed on CPU threads, unshuffled on the GPU); CuPy arrays come back
    on the current or the given device; NumPy arrays stay on the host.

    A snapshot saved on several ranks loads on any world size: ``into`` a state of DTensors (FSDP2,
    tensor parallel) fills each local shard through DCP's planner, reading only the pieces it
    needs; anything else gets whole tensors, and the per-rank values of ``rank`` (this process's
    rank in its group, else 0).

    ``mmap`` (default): a new CPU tensor stored raw is the snapshot's data file mapped
    copy-on-write, as safetensors returns tensors: nothing is copied, writing to it changes only
    this process's memory, and the file's pages (and its disk space, should retention delete the
    snapshot) stay held until the tensor is freed. ``mmap=False`` reads into memory of its own.

    ``verify`` (default): every chunk read is checked against its checksum (a mapped tensor's
    pages are then read once while loading); ``verify=False`` trusts the files as torch.load and
    safetensors do (the manifest and the files' sizes are still checked).

    ``remote`` (``s3://bucket/prefix``, else ``$SNAPD_REMOTE``): the remote tier as well; the newest
    snapshot of either tier is loaded, a remote one read chunk by chunk with ranged GETs (only the
    chunks ``keys`` selects).

    ``fetch_part(step, rank)`` brings a rank's part that lies on another node (``client.restore``
    passes the daemon's, on nodes that share no filesystem: docs/peers.md).
    """
    if rank is None:
        rank = detect().rank
    url = remote_url(remote)
    if url is not None:
        return _load_tiers(root, job, step, keys, into, device, rank, url, mmap, verify, fetch_part)
    path = catalog.resolve(root, job, step)
    with open_snapshot(path, rank, fetch_part) as reader:
        if isinstance(reader, GlobalReader) and has_dtensors(into):
            from snapd.dcp import load_into

            return load_into(path, into, keys, rank, view=reader)
        return reader.load(keys, into=into, device=device, mmap=mmap, verify=verify)


def _load_tiers(root: str | os.PathLike, job: str, step: int | str | None, keys: Any, into: Any, device: Any,
                rank: int, url: str, mmap: bool, verify: bool, fetch_part: Any = None) -> Any:
    where = locate(root, job, step, url)
    with open_located(where, rank, fetch_part) as reader:
        if isinstance(reader, GlobalReader) and has_dtensors(into):  # each shard's pieces, fetched alone
            from snapd.dcp import load_into

            return load_into(where.path, into, keys, rank, view=reader)
        return reader.load(keys, into=into, device=device, mmap=mmap, verify=verify)


def list_snapshots(root: str | os.PathLike, job: str) -> list[SnapshotInfo]:
    """Step, path, time, raw and stored sizes, metrics and latest/best marks of each snapshot."""
    return catalog.list_snapshots(root, job)
