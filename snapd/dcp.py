"""PyTorch Distributed Checkpoint reads snapd snapshots:
``dcp.load(state_dict, storage_reader=snapd.dcp.SnapshotReader(path))`` (and writes them through
``snapd.dcp.SnapshotWriter``: snapd.integrations.dcp_writer).

DCP's own planner decides which stored pieces each rank's tensors need, whatever the sharding and
world size at load time (a model under FSDP2 on N ranks, or one process with ``no_dist=True``); this
reader serves those pieces from the snapshot. The keys are DCP's: a state's nested dicts and lists
flattened with dots, as snapd's key paths already are; a tuple, or a list without tensors or dicts,
is one value to DCP, as it is to ``torch.save``.

Imports torch: import this module only where DCP is used (snapd itself never does).
"""

from __future__ import annotations

import bisect
import io
import itertools
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   StorageMeta, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from snapd.errors import FormatError, InvalidArgument, SnapshotNotFound
from snapd.format import catalog
from snapd.format import dtypes
from snapd.format.dtypes import torch_dtype
from snapd.format.global_reader import GlobalReader, open_snapshot
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.reader import SnapshotReader as FormatReader
from snapd.format.tree import build, key_matches

__all__ = ["SnapshotReader", "SnapshotWriter"]  # noqa: F822 (the writer: module __getattr__)


def snapshot_dir(path: str | os.PathLike) -> Path:
    """A snapshot directory, or a job directory's latest snapshot; ``<job>/step-<N>`` names step N
    however many digits it is written with (a checkpoint id as snapd's DCP writer takes it)."""
    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        return p
    if p.is_dir():
        return catalog.resolve(p.parent, p.name, "latest")
    m = re.match(r"^step-(\d+)\Z", p.name)
    if m is not None and p.parent.is_dir():
        return catalog.resolve(p.parent.parent, p.parent.name, int(m.group(1)))
    raise SnapshotNotFound(f"{p}: neither a snapshot directory nor a job directory")


def dcp_leaves(node: dict, path: tuple = ()) -> list[tuple[str, dict]]:
    """The (DCP key, tree node) of each value DCP reads or writes as one item: tensors, scalars, and
    the containers DCP keeps whole (tuples; lists with neither tensors nor dicts)."""
    t = node["t"]
    if t == "dict":
        return [leaf for k, v in zip(node["k"], node["v"]) for leaf in dcp_leaves(v, (*path, str(k)))]
    if t == "list" and not _terminal(node):
        return [leaf for i, v in enumerate(node["v"]) for leaf in dcp_leaves(v, (*path, i))]
    return [(".".join(map(str, path)), node)]


def _terminal(node: dict) -> bool:
    """Whether DCP keeps a list whole: none of its items is a tensor, a dict or a list it walks into."""
    return not any(v["t"] in ("tensor", "dict") or v["t"] == "list" and not _terminal(v) for v in node["v"])


class SnapshotReader(StorageReader):
    """A ``torch.distributed.checkpoint`` storage reader over one snapd snapshot (or a job's latest,
    given its directory). Each rank reads, of each tensor its plan names, only the chunks that
    hold the piece it asks for (a shard of an FSDP2 parameter: its rows), each checked. A snapshot
    saved on several ranks offers DCP every stored piece of every tensor, so DCP's planner reshards
    it onto any mesh; the values kept per rank are ``rank``'s (this process's rank by default)."""

    def __init__(self, path: str | os.PathLike | None = None, rank: int | None = None,
                 view: FormatReader | GlobalReader | None = None) -> None:
        super().__init__()
        # ``view``: a snapshot opened already (one in the remote tier: snapd.remote.reader)
        self.path = snapshot_dir(path) if path is not None else view.path if view is not None else None
        self.rank = rank
        self.load_id = uuid.uuid4().hex
        self._given = view
        self._view: FormatReader | GlobalReader | None = view

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = snapshot_dir(checkpoint_id)
        self.load_id = uuid.uuid4().hex
        self._close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            snapshot_dir(checkpoint_id)
        except (OSError, FormatError, SnapshotNotFound, InvalidArgument):
            return False
        return True

    def _open(self) -> FormatReader | GlobalReader:
        if self.path is None:
            raise InvalidArgument("SnapshotReader: no snapshot given (pass its path, or checkpoint_id=)")
        if self._view is None and self._given is not None:
            self._view = self._given
        if self._view is None:
            rank = self.rank
            if rank is None:
                dist = torch.distributed
                rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._view = open_snapshot(self.path, rank)
        return self._view

    def _close(self) -> None:
        if self._view is not None and self._view is not self._given:
            self._view.close()
        self._view = None

    def _pieces(self, i: int) -> list[tuple[int | None, list[int], list[int]]]:
        """Where tensor ``i`` of the view is stored: (rank or None, offsets, shape) of each piece."""
        view = self._open()
        if isinstance(view, GlobalReader):
            return view._sources[i]
        shape = view.manifest.tensors[i].shape
        return [(None, [0] * len(shape), shape)]

    def _locate(self, rank: int | None, i: int) -> tuple[FormatReader, int]:
        view = self._open()
        if isinstance(view, GlobalReader):
            return view.locate(rank, view.manifest.tensors[i].key)
        return view, i

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        manifest = self._open().manifest
        entries: dict[str, Any] = {}
        for key, node in dcp_leaves(manifest.tree):
            if node["t"] != "tensor":
                entries[key] = BytesStorageMetadata()
                continue
            rec = manifest.tensors[node["i"]]
            chunks = [ChunkStorageMetadata(torch.Size(offsets), torch.Size(shape))
                      for _, offsets, shape in self._pieces(node["i"])]
            entries[key] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype(rec.dtype)),
                                                 torch.Size(rec.shape), chunks)
        return Metadata(state_dict_metadata=entries,
                        storage_meta=StorageMeta(checkpoint_id=str(self.path), load_id=self.load_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self._open()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        view = self._open()
        nodes = dict(dcp_leaves(view.manifest.tree))
        try:
            for req in plan.items:
                node = nodes.get(req.storage_index.fqn)
                if node is None:
                    raise FormatError(f"{self.path}: no {req.storage_index.fqn!r} in this snapshot")
                if req.type == LoadItemType.BYTE_IO:
                    value = build(node, lambda i, key: _tensor(view, i), req.storage_index.fqn)
                    out = io.BytesIO()
                    torch.save(value, out)
                    out.seek(0)
                    planner.load_bytes(req, out)
                    continue
                self._read_item(req, node["i"], planner)
        finally:
            self._close()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_item(self, req: Any, i: int, planner: LoadPlanner) -> None:
        at = list(req.storage_index.offset) if req.storage_index.offset is not None else None
        found = [p for p in self._pieces(i) if at is None or list(p[1]) == at]
        if not found:
            raise FormatError(f"{req.storage_index.fqn}: DCP asks for a piece at {at}; none is stored there")
        reader, j = self._locate(found[0][0], i)
        piece = read_piece(reader, j, list(req.storage_offsets), list(req.lengths))
        target = planner.resolve_tensor(req).detach()
        if target.size() != piece.size():
            raise FormatError(f"{req.storage_index.fqn}: DCP asks for {tuple(target.size())}, "
                              f"the snapshot's piece is {tuple(piece.size())}")
        target.copy_(piece)
        planner.commit_tensor(req, target)


def load_into(path: str | os.PathLike | None, into: Any, keys: Any, rank: int,
              view: FormatReader | GlobalReader | None = None) -> Any:
    """Fill ``into`` (a state of DTensors and tensors, on this rank's mesh) from a snapshot through
    DCP's planner, rank by rank with no collective (``no_dist``): what ``snapd.load(into=)`` does
    for a sharded state."""
    import torch.distributed.checkpoint as dcp

    target = into if keys is None else _selected(into, [keys] if isinstance(keys, str) else list(keys))
    if not target:
        raise InvalidArgument(f"keys={keys!r} select nothing of the state given as into=")
    with warnings.catch_warnings():  # (DCP warns that no_dist means one process: here it means no collective)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=SnapshotReader(path, rank=rank, view=view), no_dist=True)
    return into


def _selected(obj: Any, keys: list[str], path: str = "") -> Any:
    """The dicts of ``obj`` cut down to the entries under ``keys`` (the same objects inside)."""
    out = {}
    for k, v in obj.items():
        p = f"{path}.{k}" if path else str(k)
        if any(key_matches(p, sel) for sel in keys):
            out[k] = v
        elif isinstance(v, dict) and any(key_matches(sel, p) for sel in keys):
            sub = _selected(v, keys, p)
            if sub:
                out[k] = sub
    return out


def _tensor(reader: FormatReader | GlobalReader, i: int) -> torch.Tensor:
    rec = reader.manifest.tensors[i]
    buf = np.empty(rec.nbytes, np.uint8)
    reader.read_tensors([i], lambda _i: memoryview(buf))
    return torch.from_numpy(buf).view(torch_dtype(rec.dtype)).reshape(rec.shape)


def read_piece(reader: FormatReader, i: int, offsets: list[int], lengths: list[int]) -> torch.Tensor:
    """Tensor ``i``'s piece ``[offsets, offsets + lengths)``, reading only the chunks that hold it:
    those overlapping the bytes from its first element to its last, in the stored row-major order."""
    rec = reader.manifest.tensors[i]
    dtype, size = torch_dtype(rec.dtype), dtypes.itemsize(rec.dtype)
    if len(offsets) != len(rec.shape) or any(o < 0 or n < 0 or o + n > d for o, n, d in
                                             zip(offsets, lengths, rec.shape)):
        raise FormatError(f"{rec.key}: the piece at {offsets} of {lengths} is not inside its {rec.shape}")
    whole_piece = tuple(slice(o, o + n) for o, n in zip(offsets, lengths))
    if 0 in lengths or not rec.shape:
        return _tensor(reader, i)[whole_piece]
    strides = [1] * len(rec.shape)  # in elements, row-major
    for d in range(len(rec.shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * rec.shape[d + 1]
    first = sum(o * s for o, s in zip(offsets, strides)) * size
    last = (sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides)) + 1) * size
    starts = list(itertools.accumulate((c.raw for c in rec.chunks), initial=0))
    if any(s % size for s in starts):  # (chunks cut within an item: not snapd's writers, read it whole)
        return _tensor(reader, i)[whole_piece]
    lo = bisect.bisect_right(starts, first) - 1  # the chunk holding the first byte
    hi = bisect.bisect_left(starts, last)  # one past the chunk holding the last
    buf = np.empty(starts[hi] - starts[lo], np.uint8)
    reader.read_run(rec, lo, hi, memoryview(buf))
    flat = torch.from_numpy(buf).view(dtype)  # (chunks hold whole items: their starts are multiples of size)
    return flat.as_strided(lengths, strides, (first - starts[lo]) // size)


def __getattr__(name: str) -> Any:
    """``snapd.dcp.SnapshotWriter``: the writer (snapd.integrations.dcp_writer), imported on first
    use, so the reader stays usable on a torch whose DCP has no async stager."""
    if name == "SnapshotWriter":
        from snapd.integrations.dcp_writer import SnapshotWriter

        return SnapshotWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
