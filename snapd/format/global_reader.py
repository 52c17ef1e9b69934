"""Reading a global snapshot (a step of a job saved on several ranks) as one rank sees it.

The rank's view is its own part's tree, in which every shared tensor (snapd.format.global_manifest)
is whole: a replicated one read from the part that stores it, a sharded one put together from its
pieces, wherever they lie; the rank's own values (``per_rank``) come from its part. A rank beyond
the world size at save time sees rank ``rank % world_size``'s own values (logged). Resharding into
a new mesh's DTensors goes through DCP (snapd.dcp), which reads only the pieces each shard needs;
this view serves a single process (evaluation, export) and plain tensors.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from snapd.errors import FormatError, SnapshotNotFound
from snapd.format import dtypes
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.jobdir import read_regular
from snapd.format.manifest import MANIFEST_NAME, Manifest, TensorRecord
from snapd.format.reader import SnapshotReader
from snapd.format.restore import load_tree, select

log = logging.getLogger(__name__)

Source = tuple[int, list[int], list[int]]  # (rank whose part stores it, offsets, shape)
FetchPart = Callable[[int, int], Any]


def open_snapshot(path: str | os.PathLike, rank: int | None = None,
                  fetch_part: FetchPart | None = None) -> SnapshotReader | GlobalReader:
    """A reader over any committed snapshot directory: a single process's, or a global one seen
    from ``rank`` (0 when None). ``fetch_part(step, rank)`` brings a part that is on another node
    (the daemon's, on nodes that share no filesystem: snapd.daemon.part_fetch)."""
    path = Path(path)
    try:
        m = parse_any(read_regular(path / MANIFEST_NAME), str(path / MANIFEST_NAME))
    except FileNotFoundError:
        if path.is_dir():
            raise FormatError(f"{path}: no {MANIFEST_NAME}: not a committed snapshot") from None
        raise SnapshotNotFound(f"{path}: no such snapshot directory") from None
    except IsADirectoryError:
        raise FormatError(f"{path / MANIFEST_NAME}: is a directory") from None
    if isinstance(m, GlobalManifest):
        return GlobalReader(path, m, rank, fetch_part)
    return SnapshotReader(path)


class GlobalReader:
    def __init__(self, path: Path, manifest: GlobalManifest, rank: int | None = None,
                 fetch_part: FetchPart | None = None) -> None:
        self.path = path
        self.fetch_part = fetch_part
        self.global_manifest = manifest
        world = manifest.world_size
        self.rank = (rank or 0) % world
        if rank is None and fetch_part is None and isinstance(path, Path):
            # no rank asked: any part gives the tree, so on a node that holds only some parts (nodes
            # that share no filesystem, FORMAT.md §10) the first one it holds
            here = [r for r in range(world) if (path / part_dir(r) / MANIFEST_NAME).exists()]
            self.rank = here[0] if here else self.rank
        self._parts: dict[int, SnapshotReader] = {}
        self._keys: dict[int, dict[str, int]] = {}
        self._mapped: dict[int, tuple[int, int]] = {}  # view tensor -> (rank, its index there), this load
        self.checked = True  # (``load(verify=False)``: the parts' chunks are read unchecked)
        try:
            base = self.part(self.rank).manifest
            self._sources, tensors = self._view(base)
        except BaseException:
            self.close()
            raise
        if rank is not None and rank >= world and any(t.scope == "rank" for t in base.tensors):
            log.warning("%s: saved on %d ranks; rank %d restores rank %d's own values", path, world, rank,
                        self.rank)
        self.manifest = Manifest(step=manifest.step, created_unix_s=manifest.created_unix_s, job=manifest.job,
                                 tree=base.tree, tensors=tensors, files=[], metrics=manifest.metrics,
                                 codec=manifest.codec, emergency=manifest.emergency, writer=manifest.writer,
                                 best_metric=manifest.best_metric, taken_unix_s=manifest.taken_unix_s)

    def _view(self, base: Manifest) -> tuple[list[list[Source]], list[TensorRecord]]:
        sources, tensors = [], []
        for rec in base.tensors:
            if rec.scope == "rank":
                tensors.append(TensorRecord(rec.key, rec.kind, rec.dtype, rec.shape, rec.nbytes))
                sources.append([(self.rank, [0] * len(rec.shape), rec.shape)])
                continue
            g = self.global_manifest.tensors.get(rec.key)
            if g is None:
                raise FormatError(f"{self.path}: {rec.key} of rank {self.rank}'s part is not in the global "
                                  "manifest")
            nbytes = math.prod(g.shape) * dtypes.itemsize(g.dtype)
            tensors.append(TensorRecord(g.key, g.kind, g.dtype, g.shape, nbytes))
            sources.append([(p.rank, p.offsets, p.shape) for p in g.pieces])
        return sources, tensors

    def part(self, rank: int) -> SnapshotReader:
        """Rank ``rank``'s part, checked to be the one the global manifest committed."""
        reader = self._parts.get(rank)
        if reader is None:
            reader = self._open_part(rank)
            want = self.global_manifest.parts[rank]["checksum"]
            if reader.manifest.checksum != want:
                reader.close()
                raise FormatError(f"{self.path / part_dir(rank)}: rank {rank}'s part is not the one this "
                                  "global snapshot committed (its manifest's checksum differs)")
            self._parts[rank] = reader
            self._keys[rank] = reader.manifest.by_key()
        reader.checked = self.checked
        return reader

    def _open_part(self, rank: int) -> SnapshotReader:
        where = self.path / part_dir(rank)
        if not (where / MANIFEST_NAME).exists() and self.path.is_dir():  # (on another node: FORMAT.md §10)
            if self.fetch_part is None:
                raise SnapshotNotFound(f"{where}: rank {rank}'s part is on another node (the job's nodes "
                                       "share no filesystem): restore through the daemon (client.restore), "
                                       "which brings it from its peers")
            self.fetch_part(self.global_manifest.step, rank)
        return SnapshotReader(where)

    def locate(self, rank: int, key: str) -> tuple[SnapshotReader, int]:
        """The part of ``rank`` and the index in it of tensor ``key`` (stored there)."""
        reader = self.part(rank)
        i = self._keys[rank].get(key)
        if i is None or not reader.manifest.tensors[i].stored:
            raise FormatError(f"{self.path}: rank {rank}'s part does not store {key}, as the global manifest "
                              "says it does")
        return reader, i

    def new_mappings(self) -> None:
        """Start a load: as SnapshotReader.new_mappings, for every part (parts opened later start
        with none)."""
        self._mapped.clear()
        for reader in self._parts.values():
            reader.new_mappings()

    def mapping(self, i: int) -> memoryview | None:
        """Tensor ``i``'s bytes mapped in the one part that stores it whole (a rank's own value, a
        replicated tensor, a shard that is the whole tensor), as SnapshotReader.mapping does; None
        for a tensor put together from pieces, or one its part cannot map."""
        rec = self.manifest.tensors[i]
        if len(self._sources[i]) != 1:
            return None
        rank, offsets, shape = self._sources[i][0]
        if any(offsets) or list(shape) != list(rec.shape):
            return None
        reader, j = self.locate(rank, rec.key)
        if reader.manifest.tensors[j].nbytes != rec.nbytes:
            return None
        view = reader.mapping(j)
        if view is not None:
            self._mapped[i] = (rank, j)
        return view

    def verify_mapped(self, wanted: list[int], threads: int | None = None) -> None:
        """Checksum the chunks of the mapped tensors ``wanted`` where they lie, part by part."""
        by_rank: dict[int, list[int]] = {}
        for i in wanted:
            rank, j = self._mapped[i]
            by_rank.setdefault(rank, []).append(j)
        for rank, js in sorted(by_rank.items()):
            self.part(rank).verify_mapped(js, threads)

    def select(self, keys: list[str] | str | None) -> list[int]:
        return select(self.manifest, keys, self.path)

    def read_tensors(self, wanted: list[int], buffer_for: Callable[[int], memoryview],
                     threads: int | None = None, keep_planes: Callable[[int], bool] = lambda i: False,
                     done: Callable[[int], None] | None = None, window_bytes: int | None = None) -> None:
        """Fill ``buffer_for(i)`` with the whole of each wanted tensor, piece by piece."""
        for i in wanted:
            rec = self.manifest.tensors[i]
            buf = buffer_for(i)
            for rank, offsets, shape in self._sources[i]:
                reader, j = self.locate(rank, rec.key)
                self._read_piece(reader, j, rec, offsets, shape, buf, threads)
            if done is not None:
                done(i)

    @staticmethod
    def _read_piece(reader: SnapshotReader, j: int, rec: TensorRecord, offsets: list[int], shape: list[int],
                    buf: memoryview, threads: int | None) -> None:
        size = dtypes.itemsize(rec.dtype)
        part = reader.manifest.tensors[j]
        if part.nbytes == 0:
            return
        if list(shape) != part.shape:
            raise FormatError(f"{rec.key}: the stored piece is {part.shape}, the global manifest says "
                              f"{shape}")
        if all(o == 0 and n == d for o, n, d in zip(offsets[1:], shape[1:], rec.shape[1:])):
            start = (offsets[0] if offsets else 0) * math.prod(rec.shape[1:]) * size  # contiguous rows
            reader.read_tensors([j], lambda _j: buf[start:start + part.nbytes], threads)
            return
        tmp = np.empty(part.nbytes, np.uint8)
        reader.read_tensors([j], lambda _j: memoryview(tmp), threads)
        whole = np.frombuffer(buf, np.uint8).reshape(*rec.shape[:-1], rec.shape[-1] * size)
        box = tuple(slice(o, o + n) for o, n in zip(offsets[:-1], shape[:-1])) + \
            (slice(offsets[-1] * size, (offsets[-1] + shape[-1]) * size),)
        whole[box] = tmp.reshape(*shape[:-1], shape[-1] * size)

    def load(self, keys: list[str] | str | None = None, *, into: Any = None, device: Any = None,
             threads: int | None = None, mmap: bool = True, verify: bool = True) -> Any:
        self.checked = verify
        try:
            return load_tree(self, keys, into, device, threads, mmap)
        finally:
            self.checked = True

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-check every chunk of every part; each problem names its rank."""
        problems = []
        for r in range(self.global_manifest.world_size):
            try:
                part = self.part(r)
            except (OSError, FormatError) as e:
                problems.append(f"rank {r}: {e}")
                continue
            problems += [f"rank {r}: {p}" for p in part.verify(progress)]
        return problems

    def close(self) -> None:
        for reader in self._parts.values():
            reader.close()
        self._parts.clear()

    def __enter__(self) -> GlobalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
