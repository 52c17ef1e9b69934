"""``Client``: snapshots through the daemon (made by ``snapd.client.hello.connect``).

``snapshot()`` flattens the state, leases a host buffer, copies every
tensor's bytes straight into it (one memcpy per byte: the daemon's
shared-memory buffer is mapped here), sends the descriptors and returns
once the daemon confirms it holds them. From then on the trainer may change
its tensors; compression and disk I/O happen in the daemon.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from snapd import protocol
from snapd.client.connection import Connection, SessionLost
from snapd.client.host_buffers import HostBuffers
from snapd.client import group_peers, snapshot_plan
from snapd.client.layout import LayoutCache
from snapd.client.hand_over import HandOver
from snapd.client.pending import Pending, Persisted
from snapd.client.ranks import Ranks
from snapd.client.local import list_snapshots, load
from snapd.errors import DaemonUnavailable, InvalidArgument, SnapdError, SnapshotNotFound
from snapd.format.jobdir import check_step
from snapd.format.saving import check_metrics
from snapd.ownership import check_socket_owner
from snapd.paths import socket_path

__all__ = ["Client", "Pending", "Persisted"]

log = logging.getLogger(__name__)

class Client(HandOver):
    def __init__(self, job: str, conn: Connection, welcome: dict, hello: dict, ranks: Ranks) -> None:
        self.job = job
        self.rank, self.world_size, self.local_rank = ranks.rank, ranks.world_size, ranks.local_rank
        self._conn = conn
        self._hello = hello
        self._regions: list = []  # registered shared regions (client.share)
        self._export_: Any = None
        self._group: Any = None  # the job's daemons found through its process group (client/group_peers.py)
        self._begin(welcome)

    def _begin(self, welcome: dict) -> None:
        """What this client holds of the daemon that welcomed it: made at connect, and anew when
        that daemon is gone and another answers on the endpoint (``_rejoin``)."""
        # the daemon's root, or this user's directory in it when the daemon serves several users
        self.root = Path(welcome.get("jobs_root", welcome["root"]))
        self._grace_s: float | None = None  # an emergency snapshot's time before the kill, when known
        self._until: float | None = None  # (monotonic) when an emergency hand-over must be done by
        self._peers = bool(welcome.get("peers"))  # the daemon has peers on other nodes (docs/peers.md)
        self._peer = welcome.get("peer")  # where they reach it (its endpoint and node)
        self.remote: str | None = welcome.get("remote")  # the daemon's remote tier, where this job is
        self._daemon_uid = welcome.get("daemon_uid", os.geteuid())
        self._buffers = HostBuffers(lambda address: self._export_ and self._export_.unpin(address))
        self._conn.daemon_pid = welcome["daemon_pid"]
        self._uncopied: list[Pending] = []  # registered-path snapshots the daemon is still copying
        self._on_gpu: list[Pending] = []  # GPU-path snapshots whose device copy is not known done
        self._welcome_cuda = welcome.get("cuda")
        self._layouts = LayoutCache()
        # the last layout's state, recognised without flattening it (client/state_memo.py)
        self._planner = snapshot_plan.Planner(self._layouts, self._registered, lambda: self._export)

    def _rejoin(self) -> None:
        """The daemon that welcomed this client is gone and another answers (systemd restarted
        it): hello again, and make anew what the old one held for this client (its host buffers,
        the layouts it knew, the shared regions registered with it, the device memory it opened).
        Snapshots the old one had not persisted are lost (their ``wait`` says so); committed ones
        are on disk."""
        # (whoever now owns the socket gets this client's tensors: the same check as at connect)
        check_socket_owner(socket_path(self._conn.endpoint), self._conn.endpoint)
        welcome = self._conn.call("hello", **self._hello)
        log.warning("the daemon at %s restarted (now pid %s): this client joined it again; snapshots the "
                    "old one had not persisted are lost", self._conn.endpoint, welcome.get("daemon_pid"))
        self._buffers.close()
        if self._export_ is not None:
            self._export_.close()
            self._export_ = None
        self._begin(welcome)
        if self._group is not None:
            self._group.tell_again()
        for region in list(self._regions):
            try:
                region.allow(self._daemon_uid)
                region.id = self._conn.call("register", path=str(region.path), bytes=region.size)["region"]
            except SnapdError as e:  # (its tensors are then copied as any others)
                log.warning("a shared region could not be registered with the new daemon: %s", e)
                self._regions.remove(region)

    def _job_peers(self, wait_s: float = 0.0, why: str = "") -> None:
        """The job's daemons looked for through its process group, once there is one
        (client/group_peers.py), and waited for up to ``wait_s`` (``why``: what waits, for the log)."""
        if self._group is None and self.world_size > 1:
            self._group = group_peers.find(self._conn, self.job, self._hello.get("run") or "", self.rank,
                                           self.world_size, self._peer)
        if self._group is not None and wait_s:
            self._group.wait(wait_s, why)

    def _again(self, call: Any) -> Any:
        """``call()``; once more after joining a restarted daemon if it no longer knows this client."""
        try:
            return call()
        except SessionLost:
            self._rejoin()
            return call()

    def snapshot(self, state: Any, *, step: int, metrics: dict | None = None,
                 emergency: bool = False) -> Pending:
        """Hand ``state`` to the daemon; returns once the daemon holds a copy of its bytes."""
        check_step(step)
        metrics = check_metrics(metrics)
        self._job_peers(group_peers.SNAPSHOT_WAIT_S, "a snapshot")  # (the first: its replicas go there)
        pending = self._again(lambda: self._hand_over(state, step, metrics, emergency))
        self._track(pending)
        return pending

    def share(self, *objects: Any) -> None:
        """Move the tensors of ``objects`` (modules, optimizers, dicts/lists of tensors) into shared
        memory the daemon reads, once. Later snapshots of them send only descriptors."""
        from snapd.client.registered import share

        region = share(objects)
        try:
            region.allow(self._daemon_uid)
            region.id = self._conn.call("register", path=str(region.path), bytes=region.size)["region"]
        except BaseException:
            region.close()
            raise
        self._regions.append(region)
        self._planner.forget()  # its tensors moved: the next snapshot is flattened

    def wait_copied(self) -> None:
        """Block (the CPU) until the daemon has copied every snapshot handed to it."""
        self._wait_registered()
        while self._on_gpu:
            self._on_gpu[0].wait_copied()
            self._on_gpu.pop(0)

    def fence(self) -> None:
        """Before mutating snapshotted tensors: wait for copies of shared (registered) tensors, and
        make the GPU (not the CPU) wait for the daemon's copies of device tensors."""
        self._wait_registered()
        for p in self._on_gpu:
            p.fence()
        self._on_gpu = [p for p in self._on_gpu if not (p.done() or p.copied)]

    def guard(self, optimizer: Any) -> Any:
        """Make ``optimizer.step()`` wait (only) for unfinished copies of snapshotted tensors."""
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.fence())

    def restore(self, step: int | str = "latest", *, keys: Any = None, into: Any = None,
                device: Any = None, mmap: bool = True, verify: bool = True) -> Any:
        """A snapshot of this job, once the daemon has written every one of them still in flight
        (``latest`` after a crash is then the last snapshot the killed trainer handed over);
        ``mmap`` and ``verify`` as for ``snapd.load``."""
        self._settle()
        fetch = None
        self._job_peers(group_peers.RESTORE_WAIT_S, "restore()")  # (a replacement node's daemon learns them)
        if self._peers:  # (nodes that share no filesystem: a job's parts on other nodes; docs/peers.md)
            if step != "best":  # (the newest step some node holds whole is committed here first)
                found = self._conn.call("locate", timeout_s=max(60.0, self._conn.timeout_s),
                                        step=step if isinstance(step, int) else None)
                if found.get("step") is None and self.remote is None:  # (not "no job under this root")
                    which = f"step {step}" if isinstance(step, int) else "snapshot"
                    raise SnapshotNotFound(f"job {self.job}: no {which} to restore on this node or its peers "
                                           f"({found.get('missing') or 'none found'})")
                if self.world_size > 1 and found.get("step") is not None:
                    step = found["step"]  # (a single process's latest stays its index's: the newest taken)

            def fetch(at: int, rank: int) -> None:
                self._conn.call("fetch_part", timeout_s=3600.0, step=at, rank=rank)
        return load(self.root, self.job, step, keys=keys, into=into, device=device, rank=self.rank,
                    remote=self.remote, mmap=mmap, verify=verify, fetch_part=fetch)

    def list(self) -> list:
        self._settle()
        self._job_peers(group_peers.RESTORE_WAIT_S, "list()")  # (as restore(): the job's other daemons first)
        if self._peers:  # (a replacement node: the newest step whose parts are all on some node is
            # committed here first; a single process's newest snapshot brought whole, as restore() does)
            self._conn.call("locate", timeout_s=max(60.0, self._conn.timeout_s), step=None)
        return list_snapshots(self.root, self.job) if (self.root / self.job).is_dir() else []

    def remove(self, step: int) -> bool:
        """Remove snapshot ``step`` of this job: from this node's disk, and from the remote tier where the
        daemon has one (a step still being written is refused: remove it once its ``wait()`` returns).
        A copy on a peer is not brought back by a restore here. True if this node held it."""
        check_step(step)
        reply = self._again(lambda: self._conn.call("remove", timeout_s=max(660.0, self._conn.timeout_s),
                                                    step=step))
        return bool(reply["removed"])

    def _settle(self) -> None:
        """``sync`` before reading what is committed; across a daemon restart, what the old one
        held is lost (logged) and what is committed is what there is to read."""
        try:
            self.sync()
        except SessionLost as e:
            log.warning("%s", e)

    def sync(self) -> None:
        """Wait until the daemon has persisted (or failed) every snapshot of this job in flight,
        this client's and any other's."""
        if self._conn.closed:
            return
        try:
            self._conn.call("sync")
        except SessionLost:  # (what the old daemon held is lost: sync must not say it is persisted)
            self._rejoin()
            raise SessionLost(f"the daemon at {self._conn.endpoint} restarted: snapshots it had not "
                              "persisted are lost (each one's wait says so); this client joined the new "
                              "one, and the snapshots committed before stay") from None

    def status(self) -> dict:
        msg = self._again(lambda: self._conn.call("status"))
        return protocol.body(msg)

    def on_preemption(self, state_fn: Any, signals: tuple = None, deadline_s: float = 25.0,
                      requeue: bool | None = None) -> None:
        """On ``signals`` (SIGTERM, SIGUSR1): an emergency snapshot of ``state_fn()``'s ``(state,
        step)``, then the signal handed on; under Slurm, SIGUSR1 also requeues the job
        (client/preemption.py). The daemon is told: stopped by the same signal (a daemon inside the
        Slurm allocation, a node's shutdown), it waits up to ``deadline_s`` for the snapshot."""
        from snapd.client.preemption import install

        install(self, state_fn, signals, deadline_s, requeue)
        try:
            self._conn.call("preempt", deadline_s=float(deadline_s), timeout_s=10.0)
        except (SnapdError, TimeoutError) as e:
            code = getattr(e, "code", "")
            if code == "bad_field":
                raise InvalidArgument(f"on_preemption: {e}") from None
            if code != "unknown_type":  # (a daemon from before waits for no one: nothing to say)
                log.warning("the daemon was not told of this preemption handler (%s): stopped with this "
                            "job, it would not wait for its emergency snapshot", e)

    def close(self) -> None:
        if self._conn.closed:
            return
        if self._group is not None:
            self._group.stop()
        try:
            self.wait_copied()
        except Exception:  # closing anyway; the error was or will be raised by the Pending
            pass
        try:
            self._conn.call("bye", timeout_s=5.0)  # (answered once the daemon has closed our CUDA handles)
        except (TimeoutError, DaemonUnavailable):
            pass
        self._conn.close()
        self._buffers.close()
        for region in self._regions:
            region.close()
        if self._export_ is not None:
            self._export_.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
