"""The daemon's answers to its clients' requests, one method a type (``_on_<type>``: the server
thread calls it with the request checked by snapd.protocol), and the sessions they open and end.

A part of Server of its own (snapd.daemon.server): the server thread is the only caller, and an
answer that raises becomes the client's error reply there. Most hand the work to the part that
owns it: the lease book (leases), the snapshots' intake (intake), their endings (endings), the
requests that reach other nodes (peer_requests), a user's removal of a snapshot (removals), the
daemon's account of itself (status).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from snapd import __version__, protocol
from snapd.cuda_driver import pid_namespace
from snapd.daemon.access import AccessPolicy, Peer
from snapd.daemon.buffers import BufferPool
from snapd.daemon.config import DaemonConfig
from snapd.daemon.endings import Endings
from snapd.daemon.intake import Handoff, Intake
from snapd.daemon.leases import Leases
from snapd.daemon.metrics import Metrics
from snapd.daemon.peer_requests import PeerRequests
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.regions import open_region
from snapd.daemon.removals import Removals
from snapd.daemon.sessions import Session, new_session
from snapd.daemon.shutdown import Shutdown
from snapd.daemon.status import Status
from snapd.errors import ProtocolError, SnapdError
from snapd.format.jobdir import JobDir, check_job_name

log = logging.getLogger(__name__)


class Requests:
    """What each request does (Server's; the attributes below are the server's parts)."""

    config: DaemonConfig
    policy: AccessPolicy
    pool: BufferPool
    pipeline: Pipeline
    sessions: dict[bytes, Session]
    metrics: Metrics
    leases: Leases
    intake: Intake
    endings: Endings
    status: Status
    peer_requests: PeerRequests
    removals: Removals
    shutdown: Shutdown
    gpu: Any
    _handoff: Handoff | None

    def _session(self, peer: bytes) -> Session:
        s = self.sessions.get(peer)
        if s is None:
            raise ProtocolError("send hello before anything else on this connection", "out_of_order")
        return s

    def _on_hello(self, peer: bytes, msg: dict, creds: Peer) -> bytes:
        check_job_name(msg["job"])  # (before anything changes: a bad name keeps the connection's session)
        root = msg.get("root")
        if root is not None and os.path.realpath(root) != os.path.realpath(self.config.root):
            raise ProtocolError(f"this daemon writes under {self.config.root}, not {msg['root']}",
                                "root_mismatch")
        old = self.sessions.pop(peer, None)
        if old:
            self.leases.release_all(old)
        if creds.pid == 0:  # (a pid namespace this daemon cannot see into: docs/clusters.md)
            log.warning("client pid %d (its own view) runs in a pid namespace this daemon cannot see: its "
                        "death goes unnoticed, and the buffers it holds stay until it says bye; run the "
                        "daemon in the host's pid namespace (Kubernetes: hostPID)", msg["pid"])
        elif msg["pid"] != creds.pid:  # another pid namespace, or a client that lies: the kernel wins
            log.info("client says pid %d, the kernel says %d: using %d", msg["pid"], creds.pid, creds.pid)
        try:
            jobs_root = self.policy.jobs_root(self.config.root, creds)
        except OSError as e:
            raise SnapdError(f"cannot create the directory for uid {creds.uid} under {self.config.root}: "
                             f"{e.strerror}") from None
        s = self.sessions[peer] = new_session(self.sessions, peer, msg, creds.pid, creds.uid, jobs_root)
        self.leases.expect(s)  # (gauges the clients too)
        if self.gpu is not None:  # the trainer's devices: be ready to copy from them by its first snapshot
            self.gpu.prepare(msg.get("cuda_devices") or [])
        self.peer_requests.hello(s)
        uploads = self.pipeline.uploads  # (the remote tier: where this client's jobs go in the bucket)
        return protocol.message("welcome", msg["id"], daemon_pid=os.getpid(), version=__version__,
                                root=str(self.config.root), jobs_root=str(jobs_root),
                                job_dir=str(JobDir(jobs_root, s.job).path), uid=creds.uid,
                                daemon_uid=os.geteuid(), buffers=self.pool.describe(creds.uid),
                                remote=uploads.url_of(jobs_root) if uploads is not None else None,
                                **self.peer_requests.welcome(), max_message_bytes=protocol.MAX_MESSAGE_BYTES,
                                cuda={"devices": self.gpu.describe() if self.gpu else [],
                                      "pid_ns": pid_namespace()})

    def _on_acquire(self, peer: bytes, msg: dict) -> bytes | None:
        return self.intake.acquire(self._session(peer), msg["id"], msg["nbytes"], msg["emergency"])

    def _on_release(self, peer: bytes, msg: dict) -> bytes:
        s = self._session(peer)
        if msg["lease"] not in s.leases:
            raise ProtocolError(f"lease {msg['lease']} is not yours", "bad_lease")
        self.leases.free(s, msg["lease"])
        return protocol.message("released", msg["id"])

    def _on_register(self, peer: bytes, msg: dict) -> bytes:
        """Open a client's region (read with pread); its tensors then travel as descriptors only."""
        s = self._session(peer)
        s.regions[rid := self.leases.new_id()] = region = open_region(msg["path"], msg["bytes"], s.pid, s.uid,
                                                                      self.config.shm_dir, s.own_pid)
        log.info("client pid %d registered %d MiB of tensors", s.pid, region.size >> 20)
        return protocol.message("registered", msg["id"], region=rid)

    def _on_snapshot(self, peer: bytes, msg: dict) -> bytes:
        reply, self._handoff = self.intake.accept(self._session(peer), msg)
        return reply

    def _on_status(self, peer: bytes, msg: dict, creds: Peer) -> bytes:
        return protocol.message("status", msg["id"], **self.status.of(creds, self.shutdown.stopping))

    def _on_preempt(self, peer: bytes, msg: dict) -> bytes:
        self._session(peer).preempt_s = msg["deadline_s"]  # (a drain waits for its emergency snapshot)
        return protocol.message("noted", msg["id"])

    def _on_ping(self, peer: bytes, msg: dict) -> bytes:
        return protocol.message("pong", msg["id"], daemon_pid=os.getpid())

    def _on_sync(self, peer: bytes, msg: dict) -> bytes | None:
        s = self._session(peer)
        return self.endings.sync(peer, s.job, s.jobs_root, msg["id"])

    def _on_remove(self, peer: bytes, msg: dict) -> None:
        self.removals.remove(self._session(peer), msg["step"], peer, msg["id"])
        return None  # (answered from its thread: snapd.daemon.removals)

    def _on_locate(self, peer: bytes, msg: dict) -> bytes | None:
        return self.peer_requests.locate(self._session(peer), msg, peer)

    def _on_fetch_part(self, peer: bytes, msg: dict) -> bytes | None:
        return self.peer_requests.fetch_part(self._session(peer), msg, peer)

    def _on_peers(self, peer: bytes, msg: dict) -> bytes:
        return self.peer_requests.learn(self._session(peer), msg)

    def _on_bye(self, peer: bytes, msg: dict) -> bytes | None:
        if peer in self.sessions:
            self._end_session(self.sessions[peer], bye=msg["id"])
            if self.gpu is not None:
                return None  # answered once the GPU copier has closed the client's handles (endings)
        return protocol.message("bye", msg["id"])

    def _end_session(self, s: Session, bye: int | None = None) -> None:
        """The client left (``bye``: the id of its request, answered once the GPU copier has closed its
        handles) or died: its leases go back, its waits end, the GPU copier closes what it opened."""
        del self.sessions[s.peer]
        self.endings.forget(s.peer)
        self.leases.release_all(s)
        if self.gpu is not None:
            self.gpu.forget(s.peer, bye)
        self.metrics.clients.set(len(self.sessions))

