"""What daemons say to each other, and a link to one peer.

A message is a JSON header frame, then at most one frame of bytes (a manifest, a piece of a data
file). Requests go from a DEALER to the peer's ROUTER and are answered in order; a link keeps up
to ``window`` requests in flight, so a transfer is not one round trip per piece. Every link and
the peer server speak CurveZMQ (snapd.peers.keys): a peer without the cluster's key never gets a
message through. A peer that does not answer within the timeout is given up: the link's socket is
closed and made anew on the next request (a late reply can never be taken for another's).

Requests (``t``): ``announce`` a rank's part (its manifest) of a step; ``replica`` (``phase`` begin
with the manifest, data, end) pushes a part to a replica holder; ``have`` asks what a peer holds of
a job; ``get`` reads bytes of a part the peer holds. Replies: ``ok``, ``have``, ``data``, ``error``.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any

import zmq

from snapd.errors import InvalidArgument, SnapdError
from snapd.format.jobdir import check_job_name
from snapd.peers.keys import PeerKeys

log = logging.getLogger(__name__)

# the bytes one ``replica`` or ``get`` message this daemon sends carries: 2 MiB pulled a peer's
# replica 10-15% faster than 4 MiB here (0.68 s against 0.78 s for 512 MiB over 4 links; why was
# not measured: CurveZMQ copies each message twice a side), and writes whole 2 MiB folios
PIECE_BYTES = 2 << 20
MAX_PIECE_BYTES = 4 << 20  # what a peer may send or ask for in one message (earlier daemons: 4 MiB)
# links pulling one file at once: CurveZMQ encrypts and decrypts on one core per link and side
# (about 490 MiB/s here; 4 links 750 MiB/s on 2 cores, more with more cores)
STREAMS = 4
MAX_MANIFEST_BYTES = 64 << 20
MAX_SOCKETS = 8192  # a context's sockets at once (snapd.daemon.serve raises the open-files limit)
# how long ask_all waits for the rest once the answers so far settle its question: a peer that
# answers at all does so in milliseconds (a busy one's ROUTER queues fairly: ``have`` waits for one
# message of each link it serves), while a lost node would cost every survey the whole timeout
SETTLED_GRACE_S = 1.0
ENDPOINT_RE = re.compile(r"tcp://[A-Za-z0-9.\-\[\]:*]+:\d{1,5}")
FILE_RE = re.compile(r"(manifest\.json|data-[0-9]{5}-of-[0-9]{5}\.bin)")


class PeerUnavailable(SnapdError, TimeoutError):
    code = "peer_unavailable"


class PeerRefused(SnapdError):
    """The peer answered with an error (``message`` says why)."""
    code = "peer_refused"


def check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str) or not ENDPOINT_RE.fullmatch(endpoint):
        raise InvalidArgument(f"peer endpoint {endpoint!r}: expected tcp://HOST:PORT")
    return endpoint


def check_peer_address(endpoint: object) -> str:
    """An endpoint another daemon is reached at: ``tcp://HOST:PORT`` with a host to connect to (not a
    wildcard to bind) and a port in 1-65535."""
    endpoint = check_endpoint(endpoint)
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if "*" in host or host in ("0.0.0.0", "[::]") or not 0 < int(port) < 65536:
        raise InvalidArgument(f"peer endpoint {endpoint!r}: not an address to reach a daemon at")
    return endpoint


def check_job_path(job: object) -> str:
    """A job's directory relative to the root (``job`` or ``user/job``): never a way out of it."""
    if not isinstance(job, str) or not 0 < len(job) <= 300:
        raise InvalidArgument(f"job path {job!r}: expected JOB or USER/JOB")
    parts = job.split("/")
    if len(parts) > 2:
        raise InvalidArgument(f"job path {job!r}: expected JOB or USER/JOB")
    for p in parts:
        check_job_name(p)
    return job


def encode(header: dict[str, Any], data: bytes | memoryview | None = None) -> list:
    frames: list = [json.dumps(header, separators=(",", ":")).encode()]
    if data is not None:
        frames.append(data)
    return frames


def decode(frames: list) -> tuple[dict[str, Any], memoryview | None]:
    """The header and the bytes of a message; raises InvalidArgument on anything malformed."""
    if not 1 <= len(frames) <= 2:
        raise InvalidArgument(f"a peer message has 1 or 2 frames, got {len(frames)}")
    try:
        header = json.loads(bytes(frames[0]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument("a peer message's header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise InvalidArgument("a peer message's header has no type")
    data = memoryview(frames[1]) if len(frames) == 2 else None
    return header, data


def context(io_threads: int = 1) -> zmq.Context:
    """A context for peer links: one socket per peer a daemon sends to or asks at once (a job's
    nodes, up to 1024 per user: snapd.peers.directory), past libzmq's default of 1023."""
    ctx = zmq.Context(io_threads=io_threads)
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    return ctx


def client_socket(ctx: zmq.Context, keys: PeerKeys, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.curve_secretkey, s.curve_publickey, s.curve_serverkey = keys.secret, keys.public, keys.public
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_MANIFEST_BYTES + 4096)
    # (a peer that is down: libzmq tries again every 100 ms by default, for as long as a request waits;
    # doubling up to 2 s spares the daemon's I/O thread when many are down, and finds one back soon)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    s.connect(endpoint)
    return s


class Link:
    """Requests to one peer from one thread (ZeroMQ sockets are not shared between threads)."""

    def __init__(self, ctx: zmq.Context, keys: PeerKeys, endpoint: str, timeout_s: float = 10.0) -> None:
        self.ctx, self.keys, self.endpoint, self.timeout_s = ctx, keys, endpoint, timeout_s
        self._sock: zmq.Socket | None = None

    def request(self, header: dict[str, Any], data: bytes | memoryview | None = None,
                timeout_s: float | None = None) -> tuple[dict[str, Any], memoryview | None]:
        return next(self.pipeline([(header, data)], 1, timeout_s))

    def pipeline(self, requests: Iterable[tuple[dict[str, Any], bytes | memoryview | None]], window: int = 8,
                 timeout_s: float | None = None) -> Iterator[tuple[dict[str, Any], memoryview | None]]:
        """The replies to ``requests``, in order, with up to ``window`` in flight. An ``error`` reply
        raises PeerRefused; no reply within the timeout raises PeerUnavailable."""
        sock = self._socket()
        timeout_ms = int(1000 * (timeout_s or self.timeout_s))
        todo = iter(requests)
        in_flight = 0
        done = False
        try:
            while True:
                while not done and in_flight < window:
                    req = next(todo, None)
                    if req is None:
                        done = True
                        break
                    if not sock.poll(timeout_ms, zmq.POLLOUT):
                        raise PeerUnavailable(f"peer {self.endpoint} takes no messages (down, or too slow)")
                    sock.send_multipart(encode(*req), copy=False)
                    in_flight += 1
                if in_flight == 0:
                    return
                if not sock.poll(timeout_ms, zmq.POLLIN):
                    raise PeerUnavailable(f"peer {self.endpoint} did not answer within "
                                          f"{timeout_ms / 1000:.0f} s (down, slow, or refusing our key)")
                header, data = decode(sock.recv_multipart(copy=False))
                in_flight -= 1
                if header["t"] == "error":
                    raise PeerRefused(f"peer {self.endpoint}: {header.get('message', '?')}")
                yield header, data
        except BaseException:
            self.reset()  # (replies still in flight must never answer a later request)
            raise

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = client_socket(self.ctx, self.keys, self.endpoint)
        return self._sock

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    close = reset


def ask_all(ctx: zmq.Context, keys: PeerKeys, endpoints: list[str], header: dict[str, Any],
            timeout_s: float, on_reply: Callable[[str, dict[str, Any] | SnapdError], None] | None = None,
            settled: Callable[[], bool] | None = None) -> dict[str, dict[str, Any] | SnapdError]:
    """``header`` asked of every one of ``endpoints`` at once, from this thread, over sockets made for
    it and closed after (a survey of the cluster holds no socket, nor thread, per peer between two):
    each one's reply header, or the error (PeerUnavailable: no reply in time; PeerRefused).

    ``on_reply`` is called with each answer as it comes. Once ``settled()`` says the answers so far
    settle the question, the others are waited for ``SETTLED_GRACE_S`` more (at least 4 times what
    the answers took), not the whole timeout: a peer that is gone (a lost node still listed) must not
    hold up every restore for the timeout, while one merely slower than the rest still answers."""
    out: dict[str, dict[str, Any] | SnapdError] = {}
    started = time.monotonic()
    cut = False  # (the deadline brought forward: the answers so far settled it)
    socks: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    try:
        for ep in endpoints:
            try:
                s = client_socket(ctx, keys, ep)
            except zmq.ZMQError as e:
                out[ep] = PeerUnavailable(f"peer {ep}: {e}")
                continue
            socks[s] = ep
            try:
                s.send_multipart(encode(header), zmq.NOBLOCK)
                poller.register(s, zmq.POLLIN)
            except zmq.Again:
                out[ep] = PeerUnavailable(f"peer {ep} takes no messages")
        deadline = time.monotonic() + timeout_s
        while len(out) < len(set(endpoints)) and (left := deadline - time.monotonic()) > 0:
            for s, _ in poller.poll(int(left * 1000) + 1):
                ep = socks[s]
                poller.unregister(s)
                try:
                    reply, _ = decode(s.recv_multipart())
                    out[ep] = reply if reply["t"] != "error" else \
                        PeerRefused(f"peer {ep}: {reply.get('message', '?')}")
                except SnapdError as e:
                    out[ep] = e
                if on_reply is not None:
                    on_reply(ep, out[ep])
            if not cut and settled is not None and len(out) < len(set(endpoints)) and settled():
                now = time.monotonic()
                cut, deadline = True, min(deadline, now + max(SETTLED_GRACE_S, 4 * (now - started)))
        waited = time.monotonic() - started
        for ep in endpoints:
            out.setdefault(ep, PeerUnavailable(
                f"peer {ep} did not answer within {waited:.1f} s, the others' answers settling it (down, "
                "slow, or refusing our key)" if cut else
                f"peer {ep} did not answer within {timeout_s:.0f} s (down, slow, or refusing our key)"))
        return out
    finally:
        for s in socks:
            s.close(linger=0)


def split(size: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[0, ``size``) as up to ``STREAMS`` contiguous ranges of about equal length, each starting at
    one of ``cuts`` (a file's chunk offsets: a chunk is then pulled whole by one link, in order, and
    checked as it comes) or, without cuts, at a multiple of ``PIECE_BYTES``."""
    if size <= 0:
        return []
    if not cuts:
        pieces = -(-size // PIECE_BYTES)
        per = -(-pieces // STREAMS)
        cuts = range(0, size, per * PIECE_BYTES)
    points = sorted({c for c in cuts if 0 < c < size})
    starts = [0]
    for k in range(1, STREAMS):
        i = bisect.bisect_left(points, k * size // STREAMS)
        if i < len(points) and points[i] > starts[-1]:
            starts.append(points[i])
    return list(zip(starts, starts[1:] + [size]))


def fetch(link: Callable[[], Link], pool: Executor, base: dict[str, Any], ranges: list[tuple[int, int]],
          put: Callable[[memoryview, int], None]) -> None:
    """The byte ``ranges`` (snapd.peers.wire.split) of a file a peer holds (``base``: the ``get``
    request, less its offset and length), each on one of ``pool``'s threads over the link ``link()``
    gives its thread, in pieces ending on multiples of ``PIECE_BYTES``; ``put(data, offset)`` for
    each piece, in order within a range, on its thread."""

    def one(lo: int, hi: int) -> None:
        ends = [*range((lo // PIECE_BYTES + 1) * PIECE_BYTES, hi, PIECE_BYTES), hi]
        asks = [({**base, "offset": o, "length": e - o}, None) for o, e in zip([lo, *ends[:-1]], ends)]
        for (ask, _), (_, data) in zip(asks, link().pipeline(asks, 4)):
            got = len(data) if data is not None else 0
            if got != ask["length"]:
                raise PeerRefused(f"got {got} of {ask['length']} bytes at {ask['offset']}")
            put(data if data is not None else memoryview(b""), ask["offset"])

    for f in [pool.submit(one, lo, hi) for lo, hi in ranges]:
        f.result()
