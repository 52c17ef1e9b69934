"""Synchronous in-process save: flatten -> encode on a thread pool -> write.

The same three stages as the daemon, in one call: chunks are encoded on
``threads`` pool threads (LZ4, zstd and xxh3 release the GIL) while the
calling thread writes finished chunks in order, with at most a few chunks
in flight so memory stays bounded whatever the state's size.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from snapd.errors import InvalidArgument
from snapd.format import dtypes
from snapd.format.jobdir import JobDir, check_step
from snapd.format import global_commit
from snapd.format.global_commit import DEFAULT_COMMIT_TIMEOUT_S
from snapd.format.incremental import Previous, encode_or_share, previous
from snapd.format.chunks import CODECS
from snapd.format.rank_parts import Role, roles
from snapd.format.leaves import TensorLeaf
from snapd.format.tree import flatten
from snapd.format.writer import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, Committed, Retention, SnapshotWriter
from snapd.kernels import chunk_step

log = logging.getLogger(__name__)

# Measured (bench/format_bench.py, 1 GiB fp32, 2 cores): shuffle-zstd stores 16%
# fewer bytes than raw and saves faster on a disk-bound node; it also loads
# faster than shuffle-lz4 here. The daemon picks per job from measurements.
DEFAULT_CODEC = "shuffle-zstd"


def check_metrics(metrics: object) -> dict[str, Any]:
    """Metrics are a flat JSON object; non-finite floats are kept as strings ("nan")."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise InvalidArgument(f"metrics must be a dict with str keys, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if v is not None and not isinstance(v, (bool, int, float, str)) and hasattr(v, "item"):
            try:
                v = v.item()  # one-element NumPy/torch values
            except (ValueError, RuntimeError):
                raise InvalidArgument(f"metric {k!r} must be a single number, got shape "
                                      f"{tuple(getattr(v, 'shape', ()))}") from None
        if isinstance(v, float) and not math.isfinite(v):
            v = repr(v)
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise InvalidArgument(f"metric {k!r} must be a number, str, bool or None, got {type(v).__name__}")
        out[k] = v
    json.dumps(out, allow_nan=False)
    return out


def check_codec(codec: object) -> str:
    if codec not in CODECS:
        raise InvalidArgument(f"unknown codec {codec!r} (one of: {', '.join(CODECS)})")
    return str(codec)


def chunk_slices(leaf: TensorLeaf, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of a tensor's chunks: whole elements, at most ``chunk_bytes`` each."""
    step = chunk_step(dtypes.itemsize(leaf.dtype), chunk_bytes)
    n = leaf.nbytes
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def save_state(root: str | os.PathLike, job: str, state: Any, *, step: int, metrics: dict | None = None,
               retention: Retention = Retention(), codec: str = DEFAULT_CODEC,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, shard_bytes: int = DEFAULT_SHARD_BYTES,
               threads: int | None = None, emergency: bool = False, rank: int = 0, world_size: int = 1,
               per_rank: tuple[str, ...] = (), commit_timeout_s: float = DEFAULT_COMMIT_TIMEOUT_S,
               run: str = "", incremental: bool = True) -> Committed:
    """Save ``state`` as snapshot ``step`` of ``job`` under ``root``; return once durable. On more
    than one rank, ``state`` is this rank's part, and the call returns once every rank's part is
    durable and the global snapshot committed (snapd.format.global_commit). ``incremental``: chunks
    unchanged since the job's latest snapshot are shared with it, not written again."""
    check_step(step)
    codec = check_codec(codec)
    metrics = check_metrics(metrics)
    tree, leaves = flatten(state)  # refuses unsupported leaves before touching the disk
    return save_leaves(root, job, tree, leaves, step=step, metrics=metrics, retention=retention, codec=codec,
                       chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, threads=threads, emergency=emergency,
                       rank=rank, world_size=world_size, per_rank=per_rank, commit_timeout_s=commit_timeout_s,
                       run=run, incremental=incremental)


def save_leaves(root: str | os.PathLike, job: str, tree: dict, leaves: list[TensorLeaf], *, step: int,
                metrics: dict, retention: Retention, codec: str, chunk_bytes: int, shard_bytes: int,
                threads: int | None, emergency: bool, rank: int, world_size: int, per_rank: tuple[str, ...],
                commit_timeout_s: float, run: str = "", incremental: bool = True) -> Committed:
    """``save_state`` of a flattened state (checked arguments)."""
    jobdir = JobDir(root, job)
    jobdir.open_for_write()
    writer = SnapshotWriter(jobdir, step, shard_bytes=shard_bytes)
    threads = threads or min(8, os.cpu_count() or 1)
    parts = roles(leaves, rank, world_size, per_rank) if world_size > 1 else None
    prev = previous(jobdir, rank, world_size) if incremental else None
    try:
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="snapd-encode") as pool:
                encode_and_write(writer, leaves, codec, pool, threads, chunk_bytes, roles=parts,
                                 previous=prev)
        finally:
            if prev is not None:
                prev.close()
        if parts is None:
            return writer.commit(tree=tree, metrics=metrics, codec=codec, retention=retention,
                                 emergency=emergency)
        sealed = writer.seal(tree=tree, metrics=metrics, codec=codec, best=retention.best,
                             emergency=emergency, part={"rank": rank, "world_size": world_size, "run": run})
    except BaseException as e:
        writer.abort()
        if parts is not None:  # (as the daemon does) the other ranks need not wait for their timeout
            global_commit.fail_step(jobdir, step, world_size, run, f"rank {rank}'s part failed: {e!r}")
        raise
    try:
        delivery = global_commit.deliver(jobdir, writer.tmp, sealed, retention)
    except BaseException:
        writer.abort()
        raise
    return global_commit.wait(delivery, commit_timeout_s)


Read = Callable[[TensorLeaf, int, int], tuple[Any, Callable[[], None] | None]]


def encode_and_write(writer: SnapshotWriter, leaves: list[TensorLeaf], codec: str, pool: Executor,
                     threads: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, read: Read | None = None,
                     roles: list[Role] | None = None, previous: Previous | None = None) -> None:
    """Encode every chunk on ``pool`` and write them in order on this thread.

    At most ``2 * threads + 2`` chunks are in flight, so memory stays bounded
    and the disk and the encoders work at the same time. The daemon's flush
    stage runs this same loop over its host buffer, with ``read(leaf, a, b)``
    giving each chunk's bytes and what to call once they are written. ``roles``: a rank's part
    (snapd.format.rank_parts), whose tensors stored by another rank are only described.
    ``previous``: the job's previous snapshot, whose stored chunks unchanged ones refer to
    (snapd.format.incremental); None writes every chunk (and records no digests).
    """
    window: collections.deque[tuple[Any, Future, Callable[[], None] | None]] = collections.deque()
    if previous is not None and previous.path is not None:
        writer.compared_with = os.path.relpath(previous.path, writer.job.path)

    def write_first() -> None:
        r, fut, release = window.popleft()
        try:
            writer.write_chunk(r, fut.result())
        finally:
            if release is not None:
                release()
    try:
        for n, leaf in enumerate(leaves):
            rec = writer.add_tensor(leaf.key, leaf.kind, leaf.dtype, leaf.shape, leaf.nbytes)
            if roles is not None:
                role = roles[n]
                rec.scope, rec.stored, rec.global_shape, rec.offsets = (role.scope, role.stored,
                                                                        role.global_shape, role.offsets)
                if not role.stored:
                    continue
            size = dtypes.itemsize(leaf.dtype)
            slices = chunk_slices(leaf, chunk_bytes)
            hashed = 0 if previous is None else previous.hash_chunks(leaf.key, len(slices))
            for n_chunk, (a, b) in enumerate(slices):
                raw, release = read(leaf, a, b) if read is not None else (leaf.data[a:b], None)
                window.append((rec, pool.submit(encode_or_share, previous, raw, size, leaf.dtype, codec,
                                                leaf.preshuffled, n_chunk < hashed), release))
                while len(window) > 2 * threads + 2:
                    write_first()
        while window:
            write_first()
    finally:
        for _, fut, release in window:
            fut.cancel()
            if release is not None and fut.cancelled():  # (one still encoding keeps its bytes)
                release()
