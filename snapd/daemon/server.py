"""The server thread: the only code that touches the ZeroMQ ROUTER socket.

It validates every request (snapd.protocol), owns the sessions, and puts the daemon's parts
together: the lease book (leases), the snapshots in flight (tasks), their intake, the stages
(pipeline, gpu_copy), what it tells clients of their endings (endings), the requests that reach
other nodes (peer_requests), its account of itself (status), and its end (shutdown). It is the
error boundary of its thread: a request, a hand-over or an event that raises becomes an error
reply or a failed snapshot, and everyone else keeps being served.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any

import zmq

from snapd import __version__, protocol
from snapd.cuda_driver import pid_namespace
from snapd.daemon.access import AccessPolicy, Peer, ZapHandler
from snapd.daemon.buffers import BufferPool
from snapd.daemon.channels import EVENTS_ENDPOINT, Replies, post
from snapd.daemon.config import DaemonConfig
from snapd.daemon.endings import Endings
from snapd.daemon.intake import Handoff, Intake
from snapd.daemon.leases import Leases
from snapd.daemon.metrics import Metrics
from snapd.daemon.peer_requests import PeerRequests
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.quotas import Quotas
from snapd.daemon.regions import open_region
from snapd.daemon.sessions import Session, gone, new_session
from snapd.daemon.shutdown import Shutdown
from snapd.daemon.status import Status, Tally
from snapd.daemon.tasks import TaskTable, failure_fields
from snapd.errors import ProtocolError, SnapdError
from snapd.format.jobdir import JobDir, check_job_name
from snapd.paths import socket_path

log = logging.getLogger(__name__)

HANDOFF_DELAY_S = 0.001  # the longest an accepted snapshot's hand-over waits behind other messages


class Server:
    def __init__(self, config: DaemonConfig, ctx: zmq.Context | None = None,
                 policy: AccessPolicy | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.policy = policy or AccessPolicy(config)
        self.zap: ZapHandler | None = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.replies = Replies(self.sock)
        self.events = self.ctx.socket(zmq.PULL)
        self.events.bind(EVENTS_ENDPOINT)
        self.pool = BufferPool(config.shm_dir, config.host_buffers, config.host_buffer_bytes)
        self.pipeline = Pipeline(config, self.ctx)
        self.sessions: dict[bytes, Session] = {}
        self.tasks = TaskTable()
        self.metrics = Metrics()
        self.tally = Tally(self.metrics)
        if self.pipeline.uploads is not None:
            self.metrics.remote(self.pipeline.uploads.status)
        if self.pipeline.peers is not None:
            self.metrics.peers(self.pipeline.peers.status)
        self.leases = Leases(config, self.pool, self.metrics, self.sessions, self.tasks, self.replies,
                             self.hand_over,
                             lambda event: post(self.ctx, event), shared=self.policy.user_dirs)
        self.quotas = Quotas(config.user_disk_bytes, self.policy.user_dirs, config.root)
        self.intake = Intake(config, self.pool, self.leases, self.quotas, self.tasks, self.pipeline,
                             self.tally)
        self.endings = Endings(self.replies, self.tasks, self.leases, self.pipeline, self.quotas, self.tally)
        self.status = Status(config, self.policy, self.pool, self.leases, self.pipeline, self.sessions,
                             self.tasks, self.tally)
        self.peer_requests = PeerRequests(self.pipeline.peers)
        self.shutdown = Shutdown(config, self.tasks, self.sessions, self.pipeline, self.intake, self.leases)
        self.gpu: Any = None  # snapd.daemon.gpu_copy.GpuCopier when the kernel backend is CUDA (enable_gpu)
        self._handoff: Handoff | None = None  # the accepted snapshot's hand-over, run after the reply
        self._handoffs: collections.deque[tuple[float, Handoff]] = collections.deque()

    def enable_gpu(self) -> None:
        """Take snapshots of device tensors by CUDA IPC (called when the backend is CUDA)."""
        from snapd.daemon.gpu_copy import GpuCopier

        self.gpu = self.intake.gpu = self.status.gpu = GpuCopier(self.ctx, self.config.chunk_bytes,
                                                                  self.pipeline.failed)
        self.pool.before_discard = lambda buf, unmap: self.gpu.unpin(buf.view.ctypes.data, unmap)
        self.pool.after_install = lambda buf: self.gpu.pin([buf.view])

    # -- lifecycle -------------------------------------------------------------
    def bind(self) -> None:
        self.zap = ZapHandler(self.ctx, self.policy)  # before bind: no peer may slip in unchecked
        ZapHandler.protect(self.sock)
        self.sock.bind(self.config.endpoint)
        self.policy.secure_socket(socket_path(self.config.endpoint))
        self.pipeline.start()
        if self.gpu is not None:
            self.gpu.start()
            self.gpu.pin([b.view for b in self.pool.buffers])

    def run(self, should_stop: Any, notifier: Any = None) -> int:
        """Serve until ``should_stop()`` is true, then drain; return the exit status.

        ``notifier`` (snapd.daemon.notify) is fed from this loop: the watchdog
        only hears from us while the loop turns.
        """
        from snapd.daemon.notify import Notifier

        notifier = notifier or Notifier(None)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.sock, zmq.POLLIN)
        next_check = 0.0
        drain_deadline = None
        while True:
            events = poller.poll(1 if self._handoffs else 100)
            for s, _ in events:
                if s is self.sock:
                    self._serve_one()
                elif self.zap is not None and s is self.zap.sock:
                    self.zap.handle()
                else:
                    self._on_event(self.events.recv())
            if self._handoffs and (not events or time.monotonic() - self._handoffs[0][0] >= HANDOFF_DELAY_S):
                while self._handoffs:
                    self._run_handoff(self._handoffs.popleft()[1])
            now = time.monotonic()
            notifier.tick()
            if now >= next_check:
                self._periodic(now, notifier)
                next_check = now + self.config.client_check_interval_s
            if should_stop() and not self.shutdown.stopping:
                self.shutdown.begin()
                notifier.stopping(self.config.drain_timeout_s)
                drain_deadline = now + self.config.drain_timeout_s
            if self.shutdown.stopping:
                ended = self.shutdown.ended(now > drain_deadline)
                if ended is not None:
                    return ended
            elif self.shutdown.idle_too_long(now):
                log.info("no clients for %.0f s; exiting", self.config.exit_when_idle_s)
                return 0

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.stop()
        self.pipeline.stop()
        self.sock.close(linger=500)
        self.events.close(linger=0)
        if self.zap is not None:
            self.zap.close()
        self.pool.close()

    def _periodic(self, now: float, notifier: Any) -> None:
        """Dead clients' sessions end, long waits end, an ended job's memory goes, systemd hears."""
        try:
            for s in gone(self.sessions):
                self._end_session(s)
            self.leases.expire_waiters(now)
            if not self.sessions and not self.tasks and not self.shutdown.stopping:
                self.leases.restore_start()  # (a job ended: its memory goes)
            notifier.status(self.status.line())
        except Exception:  # a bug of ours must not take the daemon down for everyone
            log.exception("internal error in the daemon's periodic checks")

    # -- the loop's error boundary ---------------------------------------------------
    def _on_event(self, frame: bytes) -> None:
        try:
            self.endings.on_event(json.loads(frame))
        except Exception:  # a bug of ours must not take the daemon down for everyone
            log.exception("internal error handling a stage's report")

    def _run_handoff(self, handoff: Handoff) -> None:
        """Hand an accepted snapshot to its stage; if that fails, the snapshot fails (stage
        ``receive``) and its client hears why."""
        try:
            handoff.run()
        except Exception as e:
            failed = self.pipeline.failed(handoff.task, "receive", *failure_fields(e, "receive"), e)
            self._on_event(json.dumps(failed))

    # -- requests ----------------------------------------------------------------
    def _serve_one(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        peer, frame = frames[0].bytes, b"".join(f.bytes for f in frames[1:])
        req_id, msg = None, None
        try:
            if len(frames) != 2:
                raise ProtocolError(f"expected one frame per message, got {len(frames) - 1}", "malformed")
            msg = protocol.decode_request(frame)
            req_id = msg["id"]
            if msg["type"] in ("hello", "status"):  # (they depend on who asks: the kernel's word)
                reply = getattr(self, f"_on_{msg['type']}")(peer, msg,
                                                            Peer.from_address(frames[1].get("Peer-Address")))
            else:
                reply = getattr(self, f"_on_{msg['type']}")(peer, msg)
        except SnapdError as e:
            self._refused(peer, msg or getattr(e, "request", None))
            reply = protocol.error_reply(getattr(e, "req_id", req_id), e.code, str(e))
        except RecursionError:  # nested past what our checks walk: the client's fault, not a bug of ours
            log.warning("refused a request nested too deep")
            reply = protocol.error_reply(req_id, "malformed", "message is nested too deep")
        except Exception as e:  # a bug of ours must not take the daemon down for everyone
            log.exception("internal error serving a request")
            reply = protocol.error_reply(req_id, "internal", f"internal error: {type(e).__name__}: {e}")
        # work handed to other threads starts after the reply is out (hand_over; set by a handler that
        # returned)
        handoff, self._handoff = self._handoff, None
        if reply is not None:
            self.replies.send(peer, reply)
        if handoff is not None:
            self.hand_over(handoff)

    def _refused(self, peer: bytes, msg: dict | None) -> None:
        """A refused request frees what it holds: a snapshot's lease goes back (docs/PROTOCOL.md)."""
        s = self.sessions.get(peer)
        lease = msg.get("lease") if isinstance(msg, dict) and msg.get("type") == "snapshot" else None
        if s is not None and type(lease) is int and lease in s.leases:  # (any JSON value may come here)
            self.leases.free(s, lease)

    def hand_over(self, handoff: Handoff) -> None:
        """Run a snapshot's hand-over to its stage once its reply is on its way: after the loop's
        next poll (up to HANDOFF_DELAY_S): started at once, it kept libzmq's I/O threads off a
        small machine's cores and the reply late (docs/design.md)."""
        self._handoffs.append((time.monotonic(), handoff))

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

