"""The server thread: the only code that touches the ZeroMQ ROUTER socket.

It validates every request (snapd.protocol) and answers it (snapd.daemon.requests, with the
sessions the requests open and end), and puts the daemon's parts together: the lease book
(leases), the snapshots in flight (tasks), their intake, the stages (pipeline, gpu_copy), what it
tells clients of their endings (endings), the requests that reach other nodes (peer_requests), its
account of itself (status), and its end (shutdown). It is the error boundary of its thread: a
request, a hand-over or an event that raises becomes an error reply or a failed snapshot, and
everyone else keeps being served.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any

import zmq

from snapd import protocol
from snapd.daemon.access import AccessPolicy, Peer, ZapHandler
from snapd.daemon.buffers import BufferPool
from snapd.daemon.channels import EVENTS_ENDPOINT, Replies, post
from snapd.daemon.config import DaemonConfig
from snapd.daemon.endings import Endings
from snapd.daemon.intake import Handoff, Intake
from snapd.daemon.leases import Leases
from snapd.daemon.metrics import Metrics
from snapd.daemon.peer_requests import PeerRequests
from snapd.daemon.removals import Removals
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.quotas import Quotas
from snapd.daemon.requests import Requests
from snapd.daemon.sessions import Session, gone
from snapd.daemon.shutdown import Shutdown
from snapd.daemon.status import Status, Tally
from snapd.daemon.tasks import TaskTable, failure_fields
from snapd.errors import ProtocolError, SnapdError
from snapd.paths import socket_path

log = logging.getLogger(__name__)

HANDOFF_DELAY_S = 0.001  # the longest an accepted snapshot's hand-over waits behind other messages


class Server(Requests):
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
        self.removals = Removals(self.tasks, self.pipeline.uploads, self.pipeline.peers,
                                 lambda event: post(self.ctx, event))
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
