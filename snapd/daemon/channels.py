"""How the daemon's threads talk: the server thread to clients, the stage threads to the server.

ZeroMQ sockets are not thread-safe, so each has one owner:
- ``Replies``: the ROUTER socket's sending side, used by the server thread only.
- ``Outbox``: one stage thread's PUSH socket to the server thread's events socket
  (``EVENTS_ENDPOINT``): stages report there, and only the server thread answers clients.
- ``stage_loop``: the loop of every stage thread, and its error boundary: an item whose handling
  raises is failed (its snapshot fails, naming the stage), logged once, and the loop goes on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import zmq

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

