"""``Pending`` and ``Persisted``: what ``Client.snapshot()`` hands back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

from snapd.client.connection import Connection, reply_error
from snapd.errors import Busy, SnapshotError


class Client(Protocol):
    """What a ``Pending`` needs of the client that made it (snapd.client.daemon.Client)."""

    _conn: Connection
    _export: Any  # snapd.client.cuda_export.CudaExport

    def _device_copy_failed(self, e: SnapshotError) -> None: ...

    def _track(self, pending: Pending) -> None: ...


log = logging.getLogger(__name__)

DEVICE_COPY_FAILED = ("ipc_refused", "copy")  # the daemon could not copy a snapshot from the device


@dataclass(frozen=True)
class Persisted:
    step: int
    path: Path
    codec: str
    raw_bytes: int
    stored_bytes: int
    seconds: float


class Pending:
    """A snapshot handed to the daemon.

    ``wait_copied()``: the daemon holds a copy (immediate on the plain path;
    on the registered path the daemon copies while training goes on).
    ``wait()``: the snapshot is durable.

    GPU path: a snapshot the daemon could not copy from the device (a handle it
    cannot open, its device copy failed) is handed over again, staged by this
    process, when ``fence``, ``wait_copied`` or ``wait`` learns of it: those come
    before the trainer changes the tensors, so the values are still those of the
    step. Later snapshots stage those tensors from the start.
    """

    def __init__(self, client: Client | None, step: int, req_id: int | None, *, copied: bool = True,
                 stall_s: float = 0.0, waited_s: float = 0.0, skipped: str | None = None,
                 streams: dict[str, int] | None = None, keep: list | None = None,
                 anchors: tuple[int, list] | None = None, retry: Callable[[], Pending] | None = None) -> None:
        self._client = client
        self.step = step
        self._req_id = req_id
        self.copied = copied
        self.stall_s = stall_s  # how long snapshot() blocked the trainer
        self.waited_s = waited_s  # of which waiting for a free host buffer
        self.skipped = skipped is not None
        self.reason = skipped or ""
        self._result: Persisted | None = None
        self._error: BaseException | None = None
        # GPU path: the trainer streams per device, the daemon's done events once "queued" arrives,
        # and the device tensors, kept alive until the daemon has copied them
        self._streams = streams or {}
        self._done_events: dict[str, str] | None = None
        self._fenced = not self._streams
        self._keep = keep
        self._anchors = anchors  # (seq, a tensor per allocation) for CudaExport.hold once copied
        self._retry = retry  # hands the same state over again, staged here (``_recover``)

    @property
    def on_gpu(self) -> bool:
        """Whether the daemon copies some of this snapshot from a device (the GPU path)."""
        return bool(self._streams)

    def _absorb(self, msg: dict) -> None:
        if msg["type"] == "queued":
            self._done_events = msg["events"]
            return
        if msg["type"] == "error":
            self._failed(reply_error(msg))
            return
        if msg["type"] in ("copied", "persisted"):
            self._keep = self._retry = None  # (the retry holds the state: let it go)
            self._hand_anchors(ok=True)
        if msg["type"] == "copied":
            self.copied = True
        elif msg["type"] == "persisted":
            self.copied = True
            self._result = Persisted(msg["step"], Path(msg["path"]), msg["codec"], msg["raw_bytes"],
                                     msg["stored_bytes"], msg["seconds"])

    def _failed(self, e: BaseException) -> None:
        self._error = e
        self.copied = True  # nothing left to wait for
        self._keep = None
        self._hand_anchors(ok=False)
        if self.on_gpu and isinstance(e, SnapshotError) and e.code in DEVICE_COPY_FAILED:
            self._client._device_copy_failed(e)  # the next snapshots stage those tensors here
        else:
            self._retry = None

    def _recover(self) -> bool:
        """(Before the trainer may change the tensors.) Hand a snapshot the daemon could not copy
        from the device over again, staged here; True if this now stands for that new one."""
        e = self._error
        if self._retry is None or not (isinstance(e, SnapshotError) and e.code in DEVICE_COPY_FAILED):
            return False
        retry, self._retry = self._retry, None
        try:
            again = retry()
        except Exception as e2:
            log.error("step %d: the daemon could not copy it from the device, and staging it here failed "
                      "too: %s", self.step, e2)
            return False
        log.warning("step %d: the daemon could not copy it from the device (%s); handed over again, staged "
                    "by this process", self.step, e)
        stall_s = self.stall_s + again.stall_s  # (both blocked the trainer)
        self.__dict__.update(again.__dict__)  # this object, which the caller holds, is that snapshot now
        self.stall_s = stall_s
        self._retry = None  # once: a second failure stands (no loop against a daemon that keeps failing)
        self._client._track(self)  # (partly on the GPU still, if only some handles failed)
        return True

    def _hand_anchors(self, ok: bool) -> None:
        if self._anchors is not None:
            self._client._export.hold(*self._anchors, ok=ok)
            self._anchors = None

    def _settled(self) -> bool:
        return self.skipped or self._result is not None or self._error is not None

    def _next(self, timeout: float | None) -> None:
        try:
            self._absorb(self._client._conn.wait(self._req_id, timeout))
        except TimeoutError:
            raise
        except Exception as e:  # the daemon's error for this snapshot, or the daemon gone
            self._failed(e)

    def wait_copied(self, timeout: float | None = None) -> None:
        """Block until the daemon holds its own copy; the trainer may then change its tensors."""
        while True:
            while not self.copied and not self._settled():
                self._next(timeout)
            if not self._recover():
                break  # (a failure counts as copied: nothing left to wait for; ``wait`` raises it)

    def fence(self) -> None:
        """GPU path: make the trainer's streams wait for the daemon's copy; the CPU waits only for
        the daemon to have queued it (a message that normally arrived long before)."""
        while not self._fenced:
            while self._done_events is None and not self.copied and not self._settled():
                self._next(None)
            if self._recover():
                continue  # (staged anew; still on the GPU path in part if only some handles failed)
            if self._done_events is not None and not self.copied:
                self._client._export.fence(self._done_events, self._streams)
            self._fenced = True
        self._retry = None  # the trainer may change the tensors now: never staged again from them

    def done(self) -> bool:
        while not self._settled():
            msg = self._client._conn.take(self._req_id)
            if msg is None:
                return False
            self._absorb(msg)
        return True

    def wait(self, timeout: float | None = None) -> Persisted:
        """Block until the snapshot is durable; raise SnapshotError (with code and stage) if it failed."""
        while True:
            if self.skipped:
                raise Busy(f"step {self.step} was skipped: {self.reason}")
            while not self._settled():
                self._next(timeout)
            if not self._recover():
                break
        if self._error is not None:
            raise self._error
        return self._result


