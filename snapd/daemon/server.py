"""The server thread: the only code that touches the ZeroMQ ROUTER socket.

It validates every request (snapd.protocol), owns the sessions and (through
snapd.daemon.leases) the buffer leases, hands snapshots to the pipeline and relays the pipeline's
endings to the clients. Exceptions become wire error codes here and only
here; a bad request gets an error reply and everyone else keeps being served.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from snapd import __version__, protocol
from snapd.cuda_driver import pid_namespace
from snapd.daemon.access import AccessPolicy, Peer, ZapHandler
from snapd.daemon.buffers import BufferPool
from snapd.daemon.config import DaemonConfig
from snapd.daemon.leases import Leases
from snapd.daemon.metrics import Metrics
from snapd.daemon.pipeline import EVENTS_ENDPOINT, Pipeline, Task
from snapd.daemon.quotas import Quotas
from snapd.daemon.endings import on_event, on_sync, post_event
from snapd.daemon.status import Recent, status_line, status_of
from snapd.daemon.layouts import accept_snapshot
from snapd.daemon.sessions import Session, end_session, open_region, reap_dead_clients
from snapd.errors import Busy, ProtocolError, ShuttingDown, SnapdError
from snapd.format.jobdir import JobDir, check_job_name
from snapd.format.writer import Retention
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
        self.started = time.time()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.events = self.ctx.socket(zmq.PULL)
        self.events.bind(EVENTS_ENDPOINT)
        self.pool = BufferPool(config.shm_dir, config.host_buffers, config.host_buffer_bytes)
        self.pipeline = Pipeline(config, self.ctx)
        self.sessions: dict[bytes, Session] = {}
        self.tasks: dict[int, Task] = {}
        self.stopping = False
        self.counters = {"persisted": 0, "failed": 0, "skipped": 0, "bytes_raw": 0, "bytes_stored": 0}
        self.last_error = ""
        self.recent = Recent()
        self.backend = "cpu"
        self.metrics = Metrics()
        self.leases = Leases(config, self.pool, self.metrics, self.sessions, self.tasks, self._send, self.hand_over,
                             lambda event: post_event(self.ctx, event), shared=self.policy.user_dirs)
        self.quotas = Quotas(config.user_disk_bytes, self.policy.user_dirs, config.root)
        self.idle_since = time.monotonic()
        self.gpu: Any = None  # snapd.daemon.gpu_copy.GpuCopier when the kernel backend is CUDA (enable_gpu)
        self._handoff: Any = None  # the accepted snapshot's hand-over to a stage, run after the reply
        self._handoffs: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self.syncs: list[tuple[bytes, int, set[int]]] = []  # (peer, sync request, tasks it waits for)

    def enable_gpu(self) -> None:
        """Take snapshots of device tensors by CUDA IPC (called when the backend is CUDA)."""
        from snapd.daemon.gpu_copy import GpuCopier

        self.gpu = GpuCopier(self.ctx, EVENTS_ENDPOINT, self.config.chunk_bytes)
        self.pool.before_discard = lambda buf: self.gpu.unpin(buf.view.ctypes.data)
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
                    on_event(self, json.loads(self.events.recv()))
            if self._handoffs and (not events or time.monotonic() - self._handoffs[0][0] >= HANDOFF_DELAY_S):
                while self._handoffs:
                    self._handoffs.popleft()[1]()
            now = time.monotonic()
            notifier.tick()
            if now >= next_check:
                reap_dead_clients(self)
                self.leases.expire_waiters(now)
                if not self.sessions and not self.tasks and not self.stopping:  # a job ended: its memory goes
                    self.leases.restore_start()
                next_check = now + self.config.client_check_interval_s
                notifier.status(self.status_line())
            if should_stop() and not self.stopping:
                self._begin_drain()
                notifier.stopping(self.config.drain_timeout_s)
                drain_deadline = now + self.config.drain_timeout_s
            if self.stopping:
                if not self.tasks:
                    log.info("drained; exiting")
                    return 0
                if now > drain_deadline:
                    log.error("drain deadline passed with %d snapshot(s) unpersisted", len(self.tasks))
                    return 1
            elif self._idle_too_long(now):
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

    def _begin_drain(self) -> None:
        self.stopping = True
        log.info("stopping: no new snapshots; persisting %d in flight", len(self.tasks))
        self.leases.refuse_waiters()

    def _idle_too_long(self, now: float) -> bool:
        if self.sessions or self.tasks:
            self.idle_since = now
            return False
        return self.config.exit_when_idle_s is not None and now - self.idle_since > self.config.exit_when_idle_s

    # -- requests ----------------------------------------------------------------
    def _send(self, peer: bytes, frame: bytes) -> None:
        try:
            self.sock.send_multipart([peer, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a peer that went away: nothing to tell
            log.debug("reply to a gone peer dropped: %s", e)

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
                reply = getattr(self, f"_on_{msg['type']}")(peer, msg, Peer.from_address(frames[1].get("Peer-Address")))
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
        # work handed to other threads starts after the reply is out (hand_over; set by a handler that returned)
        handoff, self._handoff = self._handoff, None
        if reply is not None:
            self._send(peer, reply)
        if handoff is not None:
            self.hand_over(handoff)

    def _refused(self, peer: bytes, msg: dict | None) -> None:
        """A refused request frees what it holds: a snapshot's lease goes back (docs/PROTOCOL.md)."""
        s = self.sessions.get(peer)
        lease = msg.get("lease") if msg is not None and msg.get("type") == "snapshot" else None
        if s is not None and lease in s.leases:
            self.leases.free(s, lease)

    def hand_over(self, start: Callable[[], None]) -> None:
        """Run a snapshot's hand-over to its stage once its reply is on its way: after the loop's
        next poll (up to HANDOFF_DELAY_S). Started at once, this work (Python, then copies on
        another thread) kept libzmq's I/O threads off a small machine's cores: on 2 cores the
        trainer got the reply for 1024 tensors 1-3 ms late, against 0.2 ms with the wait."""
        self._handoffs.append((time.monotonic(), start))

    def _session(self, peer: bytes) -> Session:
        s = self.sessions.get(peer)
        if s is None:
            raise ProtocolError("send hello before anything else on this connection", "out_of_order")
        return s

    def _on_hello(self, peer: bytes, msg: dict, creds: Peer) -> bytes:
        job = check_job_name(msg["job"])
        if msg.get("root") is not None and os.path.realpath(msg["root"]) != os.path.realpath(self.config.root):
            raise ProtocolError(f"this daemon writes under {self.config.root}, not {msg['root']}", "root_mismatch")
        old = self.sessions.pop(peer, None)
        if old:
            self.leases.release_all(old)
        retention = Retention(keep_last=msg.get("keep_last"), keep_every_steps=msg.get("keep_every_steps"),
                              best=tuple(msg["best"]) if msg.get("best") else None)
        if msg["pid"] != creds.pid:  # another pid namespace, or a client that lies: the kernel wins
            log.info("client says pid %d, the kernel says %d: using %d", msg["pid"], creds.pid, creds.pid)
        try:
            jobs_root = self.policy.jobs_root(self.config.root, creds)
        except OSError as e:
            raise SnapdError(f"cannot create the directory for uid {creds.uid} under {self.config.root}: "
                             f"{e.strerror}") from None
        self.sessions[peer] = Session(peer, job, creds.pid, creds.uid, jobs_root, retention, msg["on_busy"],
                                      notices=bool(msg.get("notices")))
        self.leases.expect(self.sessions[peer])  # (gauges the clients too)
        if self.gpu is not None:  # the trainer's devices: be ready to copy from them by its first snapshot
            self.gpu.prepare(msg.get("cuda_devices") or [])
        log.info("client pid %d uid %d connected for job %s", creds.pid, creds.uid, job)
        return protocol.reply("welcome", msg["id"], daemon_pid=os.getpid(), version=__version__,
                              root=str(self.config.root), jobs_root=str(jobs_root),
                              job_dir=str(JobDir(jobs_root, job).path), uid=creds.uid, daemon_uid=os.geteuid(),
                              buffers=self.pool.describe(creds.uid), max_message_bytes=protocol.MAX_MESSAGE_BYTES,
                              features=list(protocol.FEATURES),
                              cuda={"devices": self.gpu.describe() if self.gpu else [], "pid_ns": pid_namespace()})

    def _on_acquire(self, peer: bytes, msg: dict) -> bytes | None:
        return self.acquire(self._session(peer), msg["id"], msg["nbytes"], msg["emergency"])

    def acquire(self, s: Session, req_id: int, nbytes: int, emergency: bool, then: Any = None) -> Any:
        """A host buffer for a snapshot of ``nbytes`` (snapd.daemon.leases), within the user's quota."""
        if self.stopping:
            raise ShuttingDown("the daemon is shutting down and accepts no new snapshots")
        cap = self.config.buffer_cap
        if nbytes > cap:  # (max_host_buffer_bytes is at most max_host_memory_bytes: one names both)
            raise ProtocolError(f"a snapshot of {nbytes} bytes is over the largest host buffer this daemon makes, "
                                f"{cap} bytes: raise max_host_buffer_bytes (and the memory the daemon may use)",
                                "too_large")
        self.quotas.check(s, nbytes, self.tasks)  # before a byte is copied
        try:
            return self.leases.acquire(s, req_id, nbytes, emergency, then)
        except Busy:
            self.counters["skipped"] += 1
            self.metrics.snapshots.labels("skipped").inc()
            raise

    def _on_release(self, peer: bytes, msg: dict) -> bytes:
        s = self._session(peer)
        if msg["lease"] not in s.leases:
            raise ProtocolError(f"lease {msg['lease']} is not yours", "bad_lease")
        self.leases.free(s, msg["lease"])
        return protocol.reply("released", msg["id"])

    def _on_register(self, peer: bytes, msg: dict) -> bytes:
        """Open a client's region (read with pread); its tensors then travel as descriptors only."""
        s = self._session(peer)
        s.regions[rid := self.leases.new_id()] = region = open_region(msg["path"], msg["bytes"], s.pid, s.uid,
                                                                      self.config.shm_dir)
        log.info("client pid %d registered %d MiB of tensors", s.pid, region.size >> 20)
        return protocol.reply("registered", msg["id"], region=rid)

    def _on_snapshot(self, peer: bytes, msg: dict) -> bytes:
        reply, self._handoff = accept_snapshot(self, self._session(peer), msg)
        return reply

    def _on_status(self, peer: bytes, msg: dict, creds: Peer) -> bytes:
        return protocol.reply("status", msg["id"], **status_of(self, creds))

    def _on_ping(self, peer: bytes, msg: dict) -> bytes:
        return protocol.reply("pong", msg["id"], daemon_pid=os.getpid())

    def _on_sync(self, peer: bytes, msg: dict) -> bytes | None:
        s = self._session(peer)
        return on_sync(self, peer, s.job, s.jobs_root, msg["id"])

    def _on_bye(self, peer: bytes, msg: dict) -> bytes | None:
        if peer in self.sessions:
            end_session(self, self.sessions[peer], bye=msg["id"])
            if self.gpu is not None:
                return None  # answered once the GPU copier has closed the client's handles (endings)
        return protocol.reply("bye", msg["id"])

    def status_line(self) -> str:
        return status_line(self)

