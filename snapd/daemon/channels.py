"""How the daemon's threads talk: the server thread to clients, the stage threads to the server.

ZeroMQ sockets are not thread-safe, so each has one owner:
- ``Replies``: the ROUTER socket's sending side, used by the server thread only.
- ``Outbox``: one stage thread's PUSH socket to the server thread's events socket
  (``EVENTS_ENDPOINT``): stages report there, and only the server thread answers clients.
- ``stage_loop``: the loop of every stage thread, and its error boundary: an item whose handling
  raises is failed (its snapshot fails, naming the stage), logged once, and the loop goes on.
- ``OffThread``: requests answered from another thread (they wait), their answers sent as events.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from snapd import protocol
from snapd.errors import Busy, SnapdError

log = logging.getLogger(__name__)

EVENTS_ENDPOINT = "inproc://snapd-events"


class Replies:
    """Replies to clients on the ROUTER socket (the server thread's)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock

    def send(self, peer: bytes, frame: bytes) -> None:
        try:
            self._sock.send_multipart([peer, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a peer that went away: nothing to tell
            log.debug("reply to a gone peer dropped: %s", e)


class Outbox:
    """One thread's way to the server thread: a PUSH socket to the events socket."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._sock = ctx.socket(zmq.PUSH)
        self._sock.connect(EVENTS_ENDPOINT)

    def send(self, event: dict) -> None:
        self._sock.send(json.dumps(event).encode())

    def close(self) -> None:
        self._sock.close(linger=1000)


def post(ctx: zmq.Context, event: dict) -> None:
    """Send one event from a thread with no outbox of its own (the buffer pool's)."""
    try:
        outbox = Outbox(ctx)
    except zmq.ZMQError:  # the context is closed: the daemon is stopping
        return
    try:
        outbox.send(event)
    finally:
        outbox.close()


def stage_loop(ctx: zmq.Context, name: str, get: Callable[[], Any], handle: Callable[[Any, Outbox], None],
               fail: Callable[[Any, Exception, Outbox], None]) -> None:
    """Handle items from ``get()`` until it returns None. ``handle(item, outbox)`` does the stage's
    work; if it raises, ``fail(item, error, outbox)`` reports the item's failure (and logs it)."""
    outbox = Outbox(ctx)
    try:
        while True:
            item = get()
            if item is None:
                return
            try:
                handle(item, outbox)
            except Exception as e:
                try:
                    fail(item, e, outbox)
                except Exception:  # (reporting failed too: nothing left to tell, the loop goes on)
                    log.exception("%s: reporting a failure (%s: %s) failed", name, type(e).__name__, e)
    finally:
        outbox.close()



class OffThread:
    """Requests answered off the server thread, because they wait (on other nodes, a job's lock, the
    bucket): ``start`` runs one on ``submit``'s thread and its answer, or its error, reaches the client
    through the events socket (a ``reply`` event, with ``extra`` fields for the server thread). A
    client with ``per_client`` of them under way, or ``at_once`` in all, is told it is busy: one client
    cannot queue the others' requests away."""

    def __init__(self, post: Callable[[dict], None], submit: Callable[[Callable[[], None]], Any],
                 per_client: int, at_once: int | None = None) -> None:
        self._post, self._submit = post, submit
        self.per_client, self.at_once = per_client, at_once
        self._lock = threading.Lock()
        self._running: dict[bytes, int] = {}  # peer -> requests under way

    def start(self, peer: bytes, req_id: int, kind: str, work: Callable[[], dict], what: str,
              extra: dict | None = None) -> None:
        """(The server thread.) ``work()`` gives the ``kind`` answer's fields; ``what`` names the
        requests in a refusal ("requests to the peers")."""
        with self._lock:
            mine, total = self._running.get(peer, 0), sum(self._running.values())
            if mine >= self.per_client or self.at_once is not None and total >= self.at_once:
                raise Busy(f"{mine} of this client's {what} and {total} in all are under way already: "
                           "try again once they end")
            self._running[peer] = mine + 1

        def run() -> None:
            try:
                frame = protocol.message(kind, req_id, **work())
            except SnapdError as e:
                frame = protocol.error_reply(req_id, e.code, str(e))
            except Exception as e:  # a bug of ours: the client hears it, the daemon goes on
                log.exception("internal error answering %s", kind)
                frame = protocol.error_reply(req_id, "internal", f"internal error: {type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._running[peer] -= 1
                    if not self._running[peer]:
                        del self._running[peer]
            self._post({"event": "reply", "peer": peer.hex(), "frame": frame.decode(), **(extra or {})})

        self._submit(run)
