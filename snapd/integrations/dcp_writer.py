"""``dcp.save`` and ``dcp.async_save`` through snapd's daemon: ``snapd.dcp.SnapshotWriter``.

The writer is also DCP's async stager. Staging hands the state to the daemon as
``client.snapshot()`` does (registered memory or CUDA IPC where the tensors live there, one
memcpy into the daemon's buffer otherwise), instead of DCP's own copy to CPU memory: when
``async_save`` returns, training may change its tensors. DCP's plan and metadata are not what is
stored: the daemon writes a snapd snapshot of the state (each rank its part, one global commit),
which ``dcp.load`` reads through ``snapd.dcp.SnapshotReader`` on any world size, and ``snapd.load``
reads as any other. ``write_data``'s future, hence ``dcp.save`` and ``async_save``'s future, ends
when the snapshot is committed (durable on every rank).

A checkpoint id is a snapshot's path, ``<root>/<job>/step-<N>``: the daemon's root (or its
directory for this user), the job, the step. ``async_save`` stages before it passes its
``checkpoint_id`` on to the writer, so for it the writer is made with the path:
``w = SnapshotWriter(path); dcp.async_save(sd, checkpoint_id=path, storage_writer=w,
async_stager=w)``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import StorageWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

try:
    from torch.distributed.checkpoint.staging import AsyncStager
except ImportError:  # (DCP's async stager came with torch 2.4)
    raise ImportError(f"snapd.dcp.SnapshotWriter needs DCP's AsyncStager (torch >= 2.4); this is torch "
                      f"{torch.__version__}") from None

from snapd.errors import DaemonUnavailable, InvalidArgument
from snapd.format.jobdir import check_job_name

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)\Z")
GATE_S = 1.0  # the longest async_save's save thread waits for async_save to return


def parse_checkpoint_id(checkpoint_id: str | os.PathLike) -> tuple[Path, str, int]:
    """``<root>/<job>/step-<N>`` -> (root, job, N); ``InvalidArgument`` naming what is wrong."""
    p = Path(os.path.abspath(os.fspath(checkpoint_id)))
    m = STEP_RE.match(p.name)
    if m is None:
        raise InvalidArgument(f"checkpoint_id {os.fspath(checkpoint_id)!r}: snapd's DCP writer takes a "
                              "snapshot's path, <root>/<job>/step-<N> (the step a number)")
    return p.parent.parent, check_job_name(p.parent.name), int(m.group(1))


class SnapshotWriter(StorageWriter, AsyncStager):
    """A DCP storage writer (and async stager) that snapshots through snapd's daemon.

    ``path``: the checkpoint id, ``<root>/<job>/step-<N>`` (or given later to ``dcp.save``).
    ``client``: a ``snapd.connect()`` client of that job to use; otherwise the writer connects
    (``endpoint``, ``spawn``, ``rank``/``world_size``, ``per_rank``, ``keep_last`` as
    ``snapd.connect`` takes them) and closes its client in ``close()``. With ``no_dist=True`` on
    one rank of a group, give ``rank=0, world_size=1``: that rank then writes alone."""

    # staging is over when ``stage`` returns; DCP's ``synchronize_staging`` call, the last thing
    # ``async_save`` does on the training thread, opens the gate below
    _synchronize_after_execute = True

    def __init__(self, path: str | os.PathLike | None = None, *, client: Any = None,
                 endpoint: str | None = None, spawn: bool = True, rank: int | None = None,
                 world_size: int | None = None, per_rank: Any = None, keep_last: int | None = 5,
                 metrics: dict | None = None) -> None:
        super().__init__()
        self.checkpoint_id: str | None = None
        self._where: tuple[Path, str, int] | None = None
        self._client, self._owned = client, client is None
        self._connect = {"endpoint": endpoint, "spawn": spawn, "rank": rank, "world_size": world_size,
                         "per_rank": per_rank, "keep_last": keep_last}
        self.metrics = metrics
        self._pending: Any = None
        self._returned = threading.Event()  # cleared from ``stage`` until ``async_save`` returns
        self._returned.set()
        self._stager_thread: threading.Thread | None = None
        if path is not None:
            self.reset(path)

    # -- DCP's StorageWriter -----------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if threading.current_thread() is not self._stager_thread:
            # ``async_save``'s save thread, which DCP starts for each call: it would otherwise plan
            # with the GIL held while the training thread waits to return from ``async_save`` (up to
            # the interpreter's 5 ms switch interval, most of the call's stall). It waits here until
            # ``async_save`` is over (bounded: a caller that never synchronizes only delays it).
            self._returned.wait(GATE_S)
        if checkpoint_id is None:
            return
        where = parse_checkpoint_id(checkpoint_id)
        if self._pending is not None and where != self._where:
            raise InvalidArgument(f"checkpoint_id {os.fspath(checkpoint_id)!r}: this writer holds the state "
                                  f"staged for {self.checkpoint_id!r} (give async_save the checkpoint_id the "
                                  "writer was given, and a writer its next one once the last is saved)")
        self._where, self.checkpoint_id = where, os.fspath(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            parse_checkpoint_id(checkpoint_id)
        except InvalidArgument:
            return False
        return True

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, rank: int | None = None,
                              use_collectives: bool = True, **kwargs: Any) -> None:
        client = self._client
        if client is not None and rank is not None and client.world_size > 1 and rank != client.rank:
            raise InvalidArgument(f"DCP saves as rank {rank}, snapd's client is rank {client.rank} of "
                                  f"{client.world_size}: with no_dist=True, make the writer with rank=0, "
                                  "world_size=1 on the one rank that saves")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Hand the state over (``dcp.save``: nothing was staged), then wait for its commit."""
        out: Future[list[WriteResult]] = Future()
        try:
            if self._pending is None:
                self._hand_over(_planned_state(planner))
            pending, self._pending = self._pending, None
            pending.wait()
            out.set_result([WriteResult(index=item.index, size_in_bytes=_nbytes(item), storage_data=None)
                            for item in plan.items])
        except BaseException as e:  # (DCP raises it from the future, on this rank)
            self._pending = None
            out.set_exception(e)
        return out

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Nothing left: the snapshot is committed (its manifest is the metadata ``SnapshotReader``
        gives DCP back)."""

    def storage_meta(self) -> None:
        return None

    # -- DCP's AsyncStager ---------------------------------------------------------------------
    def stage(self, state_dict: dict) -> dict:
        """Hand ``state_dict`` to the daemon; when this returns, training may change its tensors."""
        if self._where is None:
            raise InvalidArgument("dcp.async_save stages the state before it passes checkpoint_id to the "
                                  "writer: make the writer with the path, SnapshotWriter('<root>/<job>/"
                                  "step-<N>'), and give async_save the same checkpoint_id")
        if self._pending is not None:
            raise InvalidArgument(f"this writer's checkpoint {self.checkpoint_id!r} is still being saved: "
                                  "wait for async_save's future before the writer's next checkpoint, or give "
                                  "each checkpoint in flight a writer of its own")
        self._hand_over(state_dict)
        self._stager_thread = threading.current_thread()
        self._returned.clear()
        return state_dict

    def synchronize_staging(self) -> None:
        """(Nothing to wait for: staging ended in ``stage``.) ``async_save`` is over: its save
        thread may go on."""
        self._returned.set()

    def close(self) -> None:
        if self._owned and self._client is not None:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict:
        raise InvalidArgument("snapd's DCP writer holds a connection to the daemon and does not travel to "
                              "another process: use async_save's thread executor (the default), not "
                              "AsyncCheckpointerType.PROCESS")

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------
    def _hand_over(self, state: dict) -> None:
        if self._where is None:
            raise InvalidArgument("no checkpoint_id: give dcp.save one, or make the writer with the path "
                                  "'<root>/<job>/step-<N>'")
        root, job, step = self._where
        client = self._client_for(root, job)
        self._pending = client.snapshot(state, step=step, metrics=self.metrics)

    def _client_for(self, root: Path, job: str) -> Any:
        import snapd.client as snapd

        if self._client is None:
            args = dict(self._connect, spawn=False)
            try:  # (a daemon that answers may keep this user's jobs in a directory of its own)
                self._client = snapd.connect(job, **args)
            except DaemonUnavailable:
                if not self._connect["spawn"]:
                    raise
                self._client = snapd.connect(job, **dict(args, spawn=True, root=root))
        client = self._client
        if client.job != job or os.path.realpath(client.root) != os.path.realpath(root):
            raise InvalidArgument(f"checkpoint {self.checkpoint_id!r}: the writer's daemon writes job "
                                  f"{client.job!r} under {client.root}, not job {job!r} under {root}")
        return client


def _planned_state(planner: SavePlanner) -> dict:
    """The state ``dcp.save`` gave the planner, nested again as the caller passed it."""
    state = getattr(planner, "state_dict", None)
    if not isinstance(state, dict):
        raise InvalidArgument(f"snapd's DCP writer reads the state from the planner's state_dict: "
                              f"{type(planner).__name__} has none (use DCP's DefaultSavePlanner)")
    mappings = getattr(planner, "mappings", None)
    if mappings:
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

        return unflatten_state_dict(state, mappings)
    return state


def _nbytes(item: Any) -> int:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    n = 1
    for s in item.tensor_data.chunk.sizes:
        n *= s
    return n * item.tensor_data.properties.dtype.itemsize
