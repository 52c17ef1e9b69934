"""Where restored bytes go: fresh tensors of the kind saved, or the tensors
of an existing tree (``into=``), checked all at once before any is touched.

A tensor read into host memory only on its way elsewhere (onto a GPU, or
into a target it cannot be read into directly) gets that memory when the
reader comes to it and is finished (``finish``) as soon as it is read, so a
restore holds about two reader windows of it at a time, not the whole state.

``load_tree`` is a restore from any reader (a snapshot's, or a rank's view of a global one):
which tensors the keys select (``select``), where each goes, the tree built around them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from snapd.errors import KeySelectionError, MismatchError
from snapd.format import dtypes
from snapd.format.manifest import Manifest, TensorRecord
from snapd.format.to_device import check_device, fills_on_gpu, goes_to_gpu, upload, upload_into
from snapd.format.tree import build, iter_paths, join_key, key_matches

log = logging.getLogger(__name__)


def _leaves(obj: Any, key: str = "") -> dict[str, Any]:
    """Key path -> leaf of a user's tree (the same paths flatten() gives)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, join_key(key, k)))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_leaves(v, join_key(key, i)))
        return out
    return {key: obj}


def _is_tensor(obj: Any) -> bool:
    torch = dtypes.torch_module()
    return isinstance(obj, np.ndarray) or (torch is not None and isinstance(obj, torch.Tensor))


def _target_dtype(obj: Any, key: str) -> str:
    if isinstance(obj, np.ndarray):
        return dtypes.numpy_name(obj.dtype, key)
    return dtypes.torch_name(obj.dtype, key)


def _bytes_of(obj: Any) -> np.ndarray | None:
    """A writable uint8 view of ``obj``'s memory, if it is a contiguous CPU tensor."""
    if isinstance(obj, np.ndarray):
        if obj.flags.c_contiguous and obj.flags.writeable and obj.dtype.byteorder != ">":
            return obj.reshape(-1).view(np.uint8)
        return None
    if obj.device.type == "cpu" and obj.is_contiguous() and not obj.requires_grad:
        import torch

        return obj.reshape(-1).view(torch.uint8).numpy()
    return None


class Destinations:
    """Allocates (or finds, with ``into``) the memory each wanted tensor is read into."""

    def __init__(self, manifest: Manifest, wanted: list[int], *, into: Any, device: Any, where: str,
                 mapping: Callable[[int], memoryview | None] | None = None) -> None:
        check_device(device, any(manifest.tensors[i].kind == "torch" for i in wanted))
        self.manifest = manifest
        self.device = device
        self.values: dict[int, Any] = {}
        self._pending: dict[int, tuple[Any, Any]] = {}  # i -> (target, temporary) copied after reading
        self._buffers: dict[int, np.ndarray] = {}
        self._into: set[int] = set()  # tensors that are the caller's own (never moved or replaced)
        self._gpu: set[int] = set()  # read to the host (shuffled chunks as planes), then finished on a GPU
        self._placed: set[int] = set()  # (of those) uploaded: on their device already
        self._mapped: set[int] = set()  # new CPU tensors over the mapped data file (nothing to read)
        if into is not None:
            self._match(into, wanted, where)
        for i in wanted:
            if i in self.values:
                continue
            rec = manifest.tensors[i]
            if goes_to_gpu(rec, device):
                self._gpu.add(i)  # (its host memory is made when the reader comes to it)
                self.values[i] = None
            elif (view := self._map(rec, i, mapping)) is not None:
                self.values[i] = view
                self._mapped.add(i)
            else:
                self.values[i], self._buffers[i] = self._allocate(rec)

    def _match(self, into: Any, wanted: list[int], where: str) -> None:
        targets = _leaves(into)
        problems = []
        chosen = {}
        for i in wanted:
            rec = self.manifest.tensors[i]
            t = targets.get(rec.key)
            if t is None or not _is_tensor(t):
                problems.append(f"{rec.key}: in the snapshot, not a tensor in `into`")
                continue
            if tuple(t.shape) != tuple(rec.shape):
                problems.append(f"{rec.key}: shape {tuple(rec.shape)} in the snapshot, {tuple(t.shape)} in "
                                "`into`")
            elif _target_dtype(t, rec.key) != rec.dtype:
                problems.append(f"{rec.key}: dtype {rec.dtype} in the snapshot, {_target_dtype(t, rec.key)} "
                                "in `into`")
            else:
                chosen[i] = t
        saved = {self.manifest.tensors[i].key for i in wanted}
        prefixes = {k.rsplit(".", 1)[0] for k in saved}
        for key, t in targets.items():
            if _is_tensor(t) and key not in saved and (len(wanted) == len(self.manifest.tensors)
                                                        or any(key.startswith(p + ".") for p in prefixes)):
                problems.append(f"{key}: a tensor in `into`, not in the snapshot")
        if problems:
            raise MismatchError(f"{where}: cannot restore into the given tree, nothing was changed:\n  "
                                + "\n  ".join(problems))
        for i, t in chosen.items():
            self.values[i] = t
            self._into.add(i)
            direct = _bytes_of(t)
            if direct is not None:
                self._buffers[i] = direct
            elif fills_on_gpu(self.manifest.tensors[i], t):  # its planes go up and are unshuffled there
                self._gpu.add(i)
            else:
                self._pending[i] = (t, None)  # read into a temporary (made when the reader comes to it)

    def _map(self, rec: TensorRecord, i: int, mapping: Callable[[int], memoryview | None] | None) -> Any:
        """A new tensor over the reader's mapping of its bytes, if it has one (CPU tensors only)."""
        if mapping is None or rec.kind not in ("numpy", "torch") or (
                rec.kind == "torch" and self.device is not None and str(self.device) != "cpu"):
            return None
        view = mapping(i)
        if view is None:
            return None
        if rec.kind == "torch":
            try:
                import torch
            except ImportError:  # (as ``_allocate``: NumPy, with its warning)
                pass
            else:
                return torch.frombuffer(view, dtype=torch.uint8).view(dtypes.torch_dtype(rec.dtype)
                                                                      ).reshape(rec.shape)
        return np.frombuffer(view, dtype=np.uint8).view(dtypes.numpy_dtype(rec.dtype)).reshape(rec.shape)

    def is_mapped(self, i: int) -> bool:
        return i in self._mapped

    def _allocate(self, rec: TensorRecord) -> tuple[Any, np.ndarray]:
        if rec.kind == "torch":
            try:
                import torch
            except ImportError:
                log.warning("%s was saved as a torch tensor; torch is not installed, returning NumPy",
                            rec.key)
            else:
                t = torch.empty(rec.shape, dtype=dtypes.torch_dtype(rec.dtype))
                return t, t.reshape(-1).view(torch.uint8).numpy()
        arr = np.empty(rec.shape, dtype=dtypes.numpy_dtype(rec.dtype))
        return arr, arr.reshape(-1).view(np.uint8)

    def keeps_planes(self, i: int) -> bool:
        return i in self._gpu

    def buffer(self, i: int) -> memoryview:
        if i not in self._buffers:  # on its way elsewhere: host memory for now (``finish``)
            rec = self.manifest.tensors[i]
            if i in self._gpu:
                self._buffers[i] = np.empty(rec.nbytes, dtype=np.uint8)
            else:
                tmp, self._buffers[i] = self._allocate(rec)
                self._pending[i] = (self._pending[i][0], tmp)
        return memoryview(self._buffers[i]).cast("B")

    def finish(self, i: int) -> None:
        """Tensor ``i`` is read: move it on (to the GPU, or into its target) and let its host
        memory go, if it was only passing through."""
        if i in self._gpu:
            host = self._buffers.pop(i)
            if i in self._into:
                upload_into(self.manifest.tensors[i], host, self.values[i])
            else:
                self.values[i] = upload(self.manifest.tensors[i], host, self.device)
                self._placed.add(i)
            self._gpu.discard(i)
        elif i in self._pending:
            target, tmp = self._pending.pop(i)
            del self._buffers[i]
            if isinstance(target, np.ndarray):
                np.copyto(target, tmp)
            else:
                import torch

                with torch.no_grad():
                    target.copy_(tmp if isinstance(tmp, torch.Tensor) else torch.from_numpy(tmp))

    def value(self, i: int) -> Any:
        """The finished tensor ``i`` (copied into its target, or moved to ``device``)."""
        self.finish(i)  # (a reader that did not call it)
        v = self.values[i]
        if i in self._into or i in self._placed:
            return v
        if self.manifest.tensors[i].kind == "numpy_scalar" and isinstance(v, np.ndarray):
            return v[()]
        if self.device is not None and not isinstance(v, np.ndarray):
            return v.to(self.device)
        return v


def build_tree(skeleton: dict, dest: Destinations, selected: Callable[[str], bool] | None) -> Any:
    return build(skeleton, lambda i, key: dest.value(i), selected=selected)


def select(manifest: Manifest, keys: list[str] | str | None, where: Path) -> list[int]:
    """Indices of the tensors under ``keys``; a key that selects nothing is an error."""
    if keys is None:
        return list(range(len(manifest.tensors)))
    keys = [keys] if isinstance(keys, str) else list(keys)
    paths = [p for p, node in iter_paths(manifest.tree) if p]
    missing = [k for k in keys if not any(key_matches(p, k) for p in paths)]
    if missing:
        raise KeySelectionError(f"{where}: no such key(s): {', '.join(map(repr, missing))}")
    return [i for i, t in enumerate(manifest.tensors) if any(key_matches(t.key, k) for k in keys)]


def load_tree(reader: Any, keys: list[str] | str | None, into: Any, device: Any, threads: int | None,
              mapped: bool = True) -> Any:
    """``reader``'s tree (or the ``keys`` sub-trees): a snapshot's (``SnapshotReader``) or a global
    one's as a rank sees it (snapd.format.global_reader), through their ``read_tensors``; with
    ``mapped``, tensors the reader can map (its ``mapping``) are checked in place, not read."""
    wanted = reader.select(keys)
    if mapped and hasattr(reader, "new_mappings"):
        reader.new_mappings()
    dest = Destinations(reader.manifest, wanted, into=into, device=device, where=str(reader.path),
                        mapping=getattr(reader, "mapping", None) if mapped else None)
    reader.read_tensors([i for i in wanted if not dest.is_mapped(i)], dest.buffer, threads, dest.keeps_planes,
                        done=dest.finish)
    if reader.checked and any(dest.is_mapped(i) for i in wanted):
        reader.verify_mapped([i for i in wanted if dest.is_mapped(i)], threads)
    selected = None if keys is None else (
        lambda p: any(key_matches(p, k) for k in ([keys] if isinstance(keys, str) else keys)))
    return build_tree(reader.manifest.tree, dest, selected)
