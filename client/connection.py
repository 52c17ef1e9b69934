"""One connection to the daemon: a DEALER socket, request ids, and replies.

Every message is a single frame, and every socket call is made under one
re-entrant lock, so the preemption handler (which runs in the main thread,
between any two bytecodes) can send a whole request from the middle of
another call without interleaving frames. Replies are filed by request id;
whoever waits pumps the socket.

ZeroMQ's connect never fails and messages to a missing peer just queue, so
liveness is checked the only way that works: a ping that must be answered
within the timeout. A daemon that refuses this uid does so in the handshake
(snapd.daemon.access), which only a socket monitor sees: it becomes a
PermissionDenied instead of a silent timeout. The monitor also sees the
connection close (the daemon killed, exited or restarted): every request sent
before that and not yet answered fails at once, never to be answered, instead of
after the timeout; one sent after it waits for a daemon to answer as before. A
daemon that never welcomed this client's hello says so (SessionLost: the client
joins it, snapd.client.daemon).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from snapd import protocol
from snapd.errors import DaemonUnavailable, PermissionDenied, SnapshotError, error_from_code
from snapd.paths import access_problem, check_endpoint, default_endpoint

log = logging.getLogger(__name__)


def reply_error(msg: dict) -> Exception:
    """The exception an error reply stands for: a failed stage is a SnapshotError."""
    if msg.get("stage"):
        return SnapshotError(msg.get("message", ""), msg.get("code", ""), msg["stage"],
                             {k: msg[k] for k in ("refused", "any_open") if k in msg})
    return error_from_code(msg.get("code", "error"), msg.get("message", ""))


class SessionLost(DaemonUnavailable):
    """The daemon answering is not the one that welcomed this client's hello (it restarted)."""


class Connection:
    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self.endpoint = endpoint = check_endpoint(endpoint)
        self.timeout_s = timeout_s
        self._lock = threading.RLock()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        # (only a connection past its handshake can have taken a request: one that closes before
        # that, such as a private daemon that lost the race for the endpoint, took nothing, and
        # what was queued goes to the daemon the socket reconnects to)
        self._handshaken = False
        self._sock.connect(endpoint)
        self._ids = iter(range(1, 2**62))
        self._replies: dict[int, collections.deque[dict]] = collections.defaultdict(collections.deque)
        self.daemon_pid: int | None = None
        self.epoch = 0  # bumped when the daemon is found restarted, or the connection closed
        self._lost_why = "restarted before answering"  # (why the requests of an older epoch were lost)
        self.session = False  # whether a hello was welcomed (snapd.client.hello.connect)
        self._sent_epoch: dict[int, int] = {}
        self._unwanted: set[int] = set()
        self.closed = False

    def send(self, kind: str, **fields: Any) -> int:
        with self._lock:
            if self.closed:
                raise DaemonUnavailable("this client is closed")
            self._check_events()  # (a close already seen ends the epoch before this request is in it)
            req_id = next(self._ids)
            self._sent_epoch[req_id] = self.epoch
            try:
                self._sock.send(protocol.message(kind, req_id, **fields))
            except zmq.Again:
                raise DaemonUnavailable(f"no daemon takes messages at {self.endpoint}") from None
            return req_id

    def _pump(self, timeout_s: float) -> bool:
        """Receive what has arrived (waiting up to ``timeout_s``); True if anything did."""
        with self._lock:
            if not self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                self._check_events()
                return False
            while True:
                try:
                    frame = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return True
                msg = protocol.decode_reply(frame)
                if msg.get("id") in self._unwanted:  # the pong of a liveness ping whose wait ended first
                    self._unwanted.discard(msg["id"])
                elif msg.get("id") is not None:
                    self._replies[msg["id"]].append(msg)

    def _check_events(self) -> None:
        """The socket monitor's news: a refusal raises; a connection that closes after its handshake
        ends the epoch (a reply that came before the close is still taken: ``wait`` looks for
        replies before it looks at the epoch)."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                if not self._handshaken:
                    continue
                self._handshaken = False
                log.warning("the connection to the daemon at %s closed: requests it had not answered "
                            "are lost", self.endpoint)
                self.epoch += 1
                self._lost_why = ("closed the connection before answering (it exited or restarted, or "
                                  "dropped a message over its size limit)")
                continue
            self._refused(event)

    def _refused(self, event: dict) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise PermissionDenied(
                f"the daemon at {self.endpoint} refused this process (uid {os.geteuid()}, gid "
                f"{os.getegid()}): its config does not allow this user (allowed_users, allowed_groups, "
                "socket_group); ask the node's operator, or run a daemon of your own on another endpoint")

    def take(self, req_id: int) -> dict | None:
        """The next reply to ``req_id`` if one has arrived (pumps without waiting)."""
        with self._lock:
            self._pump(0)
            q = self._replies.get(req_id)
            return q.popleft() if q else None

    def wait(self, req_id: int, timeout_s: float | None = None, *, liveness: bool = True) -> dict:
        """Wait for the next reply to ``req_id``; raise the error it carries.

        While waiting, a silence of half ``self.timeout_s`` sends a ping; no answer of any
        kind within ``self.timeout_s`` of silence means the daemon is gone (DaemonUnavailable).
        ``timeout_s`` bounds the whole wait (TimeoutError); None waits as long as
        the daemon is alive.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        ping: int | None = None
        try:
            while True:
                msg = self.take(req_id)
                if msg is not None and msg["type"] == "waiting":  # the daemon says why, and for how long
                    log.warning("a snapshot waits for a host buffer: %s (at most %s s, then it is skipped)",
                                msg.get("why"), msg.get("at_most_s"))
                    quiet_since = time.monotonic()
                    continue
                if msg is not None:
                    if msg["type"] == "error":
                        self._sent_epoch.pop(req_id, None)
                        raise self._error(msg)
                    if msg["type"] in ("persisted", "pong", "welcome", "status", "bye", "released", "synced"):
                        self._sent_epoch.pop(req_id, None)
                    return msg
                if ping is not None and (pong := self.take(ping)) is not None:
                    self._pong(pong)
                    ping, quiet_since = None, time.monotonic()
                if self._sent_epoch.get(req_id, self.epoch) < self.epoch:
                    raise DaemonUnavailable(f"the daemon at {self.endpoint} {self._lost_why}; this "
                                            "request was lost")
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError(f"no answer from the daemon within {timeout_s} s")
                slice_s = 0.05 if deadline is None else max(0.0, min(0.05, deadline - now))
                if self._pump(slice_s):
                    quiet_since = time.monotonic()
                elif liveness:
                    quiet = time.monotonic() - quiet_since
                    if quiet > self.timeout_s:
                        raise DaemonUnavailable(f"the daemon at {self.endpoint} did not answer for "
                                                f"{self.timeout_s} s")
                    if ping is None and quiet > self.timeout_s / 2:
                        ping = self.send("ping")
        finally:
            if ping is not None:  # its pong, if one comes, is dropped on arrival
                with self._lock:
                    self._sent_epoch.pop(ping, None)
                    if self._replies.pop(ping, None) is None:
                        self._unwanted.add(ping)

    def _error(self, msg: dict) -> Exception:
        if msg.get("code") == "out_of_order" and self.session:  # (hello was welcomed: by another daemon)
            return SessionLost(
                f"the daemon at {self.endpoint} no longer knows this client: it restarted since this "
                f"client's hello (pid {self.daemon_pid}), and the session went with it; connect again "
                "(snapd.connect) to snapshot on")  # (Client joins it by itself: this is for bare connections)
        return reply_error(msg)

    def _pong(self, msg: dict) -> None:
        pid = msg.get("daemon_pid")
        self._sent_epoch.pop(msg.get("id"), None)
        if self.daemon_pid is not None and pid != self.daemon_pid:
            log.warning("the daemon restarted (pid %s -> %s): snapshots it had not persisted were lost",
                        self.daemon_pid, pid)
            self.epoch += 1
            self._lost_why = "restarted before answering"
        self.daemon_pid = pid

    def call(self, kind: str, timeout_s: float | None = None, **fields: Any) -> dict:
        return self.wait(self.send(kind, **fields), timeout_s if timeout_s is not None else self.timeout_s,
                         liveness=False)

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._sock.close(linger=0)


def probe(endpoint: str, timeout_s: float) -> dict | None:
    """The daemon's pong if one answers at ``endpoint`` within ``timeout_s``."""
    conn = Connection(endpoint, timeout_s)
    try:
        return conn.call("ping", timeout_s)
    except (TimeoutError, DaemonUnavailable):
        return None
    finally:
        conn.close()


def daemon_status(endpoint: str | None = None, timeout_s: float = 3.0) -> dict:
    """``snapd status``: the daemon's own account of itself (docs/PROTOCOL.md)."""
    endpoint = endpoint or default_endpoint()
    conn = Connection(endpoint, timeout_s)
    try:
        msg = conn.call("status", timeout_s)
    except TimeoutError:
        refused = access_problem(conn.endpoint)
        if refused:
            raise PermissionDenied(refused) from None
        raise DaemonUnavailable(f"no daemon answered at {endpoint} within {timeout_s} s") from None
    finally:
        conn.close()
    return protocol.body(msg)
