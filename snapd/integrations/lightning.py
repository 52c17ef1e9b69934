"""PyTorch Lightning saves through snapd: ``Trainer(plugins=[SnapdCheckpointIO()])``.

Lightning's ``ModelCheckpoint`` still decides when to save, which checkpoints to keep and which is
best; this plugin only changes how a checkpoint is written. ``save_checkpoint`` hands the
checkpoint to the daemon (one memcpy, or none for shared tensors) and returns: the training step
does not wait for the disk. At Lightning's path it writes a small pointer file (the daemon's job
directory and the step), so everything Lightning does with paths (``last.ckpt``, its links, top-k
bookkeeping, ``ckpt_path="last"``) works as before; ``load_checkpoint`` follows the pointer (and
reads a file that is no pointer, an older ``.ckpt``, with ``torch.load`` as Lightning would);
``remove_checkpoint`` removes the pointer, and the snapshot once no pointer names its step;
``teardown`` waits for every snapshot still in flight.

Each checkpoint is the snapshot of its ``global_step`` (two files saved at one step, a top-k one
and ``last.ckpt``, share it). What Lightning stores besides tensors (hyper-parameters, loop and
callback state) is kept where it is plain data; anything that would need pickle is refused naming
its key path, with the remedy.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from snapd.errors import Busy, InvalidArgument, SnapshotNotFound, UnsupportedValueError
from snapd.format import catalog
from snapd.format.jobdir import JobDir, fsync_dir, snapshot_name
from snapd.format.retention import remove_step

log = logging.getLogger(__name__)

POINTER_MAGIC = "snapd-lightning-checkpoint"


class SnapdCheckpointIO(CheckpointIO):
    """Lightning's ``CheckpointIO`` through snapd's daemon. ``job``: the snapshots' job (default
    ``$SNAPD_JOB``, else ``lightning``); ``endpoint``/``spawn``/``root``: as ``snapd.connect``;
    ``wait_s``: how long ``load_checkpoint`` waits for a snapshot still being written."""

    def __init__(self, job: str | None = None, *, endpoint: str | None = None, spawn: bool = True,
                 root: str | os.PathLike | None = None, wait_s: float = 120.0) -> None:
        super().__init__()
        self.job = job or os.environ.get("SNAPD_JOB") or "lightning"
        self._args = {"endpoint": endpoint, "spawn": spawn, "root": root}
        self.wait_s = wait_s
        self._client: Any = None
        self._pending: dict[int, Any] = {}  # step -> Pending, until teardown
        # pointers' fsyncs and removals, in order, off the training thread
        self._files = ThreadPoolExecutor(1, thread_name_prefix="snapd-lightning-files")
        self._later_done: list[Future] = []
        self._removing: set[str] = set()
        self._stop = threading.Event()

    @property
    def client(self) -> Any:
        if self._client is None:
            import snapd.client as snapd

            # Lightning's ModelCheckpoint decides what to keep: the daemon keeps every step. Lightning
            # saves a whole checkpoint from global rank 0 alone (its sharded strategies save through
            # DCP, not through a CheckpointIO): one process's snapshot, whatever the group says
            self._client = snapd.connect(self.job, keep_last=None, rank=0, world_size=1, **self._args)
        return self._client

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise InvalidArgument(f"SnapdCheckpointIO takes no storage_options (got {storage_options!r})")
        step = checkpoint.get("global_step")
        if not isinstance(step, int) or step < 0:
            raise InvalidArgument(f"a Lightning checkpoint without an int global_step ({step!r}): {path}")
        path = Path(path)
        self._settle(path)
        job_dir = str(self.client.root / self.job)
        replaced = _read_pointer(path)
        # the pointer first, while the disk is quiet (after the hand-over, the daemon's writes make
        # any file operation here wait for the journal: bench, 0.25 s); durable once its snapshot is
        _write_pointer(path, {"magic": POINTER_MAGIC, "job_dir": job_dir, "step": step})
        try:
            self._pending[step] = self.client.snapshot(checkpoint, step=step)
        except BaseException as e:
            _put_back(path, replaced)
            if isinstance(e, UnsupportedValueError):
                raise UnsupportedValueError(
                    f"{e}. Keep such values out of the checkpoint (save_hyperparameters(ignore=[...]) for "
                    "modules and objects passed to __init__, a callback's state_dict returning plain data), "
                    "or use Lightning's TorchCheckpointIO") from None
            raise
        self._pending = {s: p for s, p in self._pending.items() if s == step or not p.done()}
        self._later(self._sync_when_committed, path, Path(job_dir), step)
        if replaced is not None and replaced["step"] != step:  # (last.ckpt moving on)
            self._later(self._release, replaced, path.parent)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        pointer = _read_pointer(Path(path))
        if pointer is None:  # a checkpoint Lightning wrote itself
            from lightning.pytorch.plugins.io import TorchCheckpointIO

            return TorchCheckpointIO().load_checkpoint(path, map_location=map_location,
                                                       weights_only=weights_only)
        if map_location is not None and not isinstance(map_location, (str, _torch_device())):
            raise InvalidArgument(f"SnapdCheckpointIO loads onto a device: map_location {map_location!r} "
                                  "(a function or a dict) is not supported")
        job_dir, step = Path(pointer["job_dir"]), pointer["step"]
        self._wait(job_dir, step, path)
        import snapd.client as snapd

        return snapd.load(job_dir.parent, job_dir.name, step, device=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer, and the snapshot once no pointer names it: on the plugin's file thread,
        in order (right after a save, a file operation here would wait behind the daemon's writes)."""
        self._removing.add(str(path))
        self._later(self._remove, Path(path))

    def _remove(self, path: Path) -> None:
        pointer = _read_pointer(path)
        path.unlink(missing_ok=True)
        self._removing.discard(str(path))
        if pointer is not None:
            self._release(pointer, path.parent)

    def _release(self, pointer: dict, directory: Path) -> None:
        """(The file thread.) Remove the snapshot ``pointer`` named once it is committed, unless
        another pointer in ``directory`` (last.ckpt and a top-k file of one step) still names it."""
        job_dir, step = Path(pointer["job_dir"]), pointer["step"]
        if not self._committed(job_dir, step):
            return
        if any(p["step"] == step and p["job_dir"] == pointer["job_dir"] for p in _pointers(directory)):
            return
        client = self._client
        if client is None or job_dir != client.root / client.job:  # (another run's: its files, if writable)
            remove_step(JobDir(job_dir.parent, job_dir.name), step)
            return
        # through the daemon: where it serves several users their directories are its own
        for _ in range(100):  # (committed, its snapshot's end a moment behind: asked again)
            try:
                client.remove(step)
                return
            except Busy:
                time.sleep(0.05)
        log.warning("step %d of %s stays: its snapshot is still being written", step, job_dir)

    def _committed(self, job_dir: Path, step: int) -> bool:
        """(The file thread.) Wait until snapshot ``step`` is committed, as seen on disk (one thread
        waits on a ``Pending``: the training thread); False if ``wait`` gave up on it."""
        manifest = job_dir / snapshot_name(step) / "manifest.json"
        while not manifest.is_file():
            if self._stop.is_set():
                return False
            time.sleep(0.05)
        return True

    def _later(self, fn: Any, *args: Any) -> None:
        done = [f for f in self._later_done if f.done()]
        for f in done:  # (a failure on the file thread shows at the next save)
            self._later_done.remove(f)
            f.result()
        self._later_done.append(self._files.submit(fn, *args))

    def _settle(self, path: Path) -> None:
        """Before writing at ``path``: a removal of it still queued goes first."""
        if str(path) in self._removing:
            for f in list(self._later_done):
                f.result()

    def wait(self) -> None:
        """Wait for every snapshot still being written and its pointer's fsync (a failed one raises)."""
        try:
            for step in sorted(self._pending):
                self._pending[step].wait()
        finally:
            self._stop.set()  # (what waits for snapshots that failed gives up)
            try:
                for f in self._later_done:
                    f.result()
            finally:
                self._stop.clear()
                self._pending.clear()
                self._later_done.clear()

    def _sync_when_committed(self, path: Path, job_dir: Path, step: int) -> None:
        """(The file thread.) Make the pointer at ``path`` durable once its snapshot is committed,
        if it still names that step."""
        if not self._committed(job_dir, step):
            return
        try:
            named = _read_pointer(path)
        except InvalidArgument:
            return
        if named is None or named["step"] != step:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    def teardown(self) -> None:
        """``wait``, then let go of the daemon."""
        try:
            self.wait()
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _wait(self, job_dir: Path, step: int, path: Any) -> None:
        pending = self._pending.get(step)
        if pending is not None:
            pending.wait()
            return
        if not job_dir.parent.is_dir():  # (a DDP rank on a node that does not share the root)
            raise SnapshotNotFound(
                f"{path} points at step {step} under {job_dir}, whose root is not on this node: every "
                "rank loads what rank 0 saved, so snapd's root must be on a filesystem the ranks share "
                "(or each node's daemon given the same remote tier: snapd.load(..., remote=...))")
        deadline = time.monotonic() + self.wait_s
        while not (job_dir / snapshot_name(step) / "manifest.json").is_file():
            if time.monotonic() >= deadline:
                raise SnapshotNotFound(f"{path}: its snapshot, step {step} under {job_dir}, was not "
                                       f"committed within {self.wait_s:.0f} s (its daemon died before it "
                                       "was durable?)")
            time.sleep(0.1)
        catalog.resolve(job_dir.parent, job_dir.name, step)  # (readable: raises naming what is wrong)


def pointed_at(path: str | os.PathLike) -> tuple[Path, int] | None:
    """The job directory and step a checkpoint file written by the plugin points at (None: the file
    is no pointer, a checkpoint Lightning wrote itself)."""
    pointer = _read_pointer(Path(path))
    return None if pointer is None else (Path(pointer["job_dir"]), pointer["step"])


def _torch_device() -> type:
    import torch

    return torch.device


def _write_pointer(path: Path, body: dict) -> None:
    """Write the pointer whole, or not at all (a rename): durable later (``_sync_when_committed``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(body, f)
    os.replace(tmp, path)


def _put_back(path: Path, replaced: dict | None) -> None:
    """A save that failed: the pointer it replaced goes back (or none, if there was none)."""
    if replaced is None:
        path.unlink(missing_ok=True)
    else:
        _write_pointer(path, replaced)


def _read_pointer(path: Path) -> dict | None:
    """The pointer at ``path``, or None if the file is something else (a torch.save checkpoint)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except (FileNotFoundError, IsADirectoryError):
        return None
    if POINTER_MAGIC.encode() not in head:
        return None
    try:
        body = json.loads(head)
        if body.get("magic") == POINTER_MAGIC and isinstance(body.get("step"), int) and \
                isinstance(body.get("job_dir"), str):
            return body
    except ValueError:
        pass
    raise InvalidArgument(f"{path}: a damaged snapd checkpoint pointer")


def _pointers(directory: Path) -> list[dict]:
    out = []
    for p in directory.iterdir() if directory.is_dir() else []:
        try:
            body = _read_pointer(p) if p.is_file() else None
        except InvalidArgument:
            body = None
        if body is not None:
            out.append(body)
    return out
