"""The peer server thread: the only code that touches the socket other nodes' daemons reach.

It binds ``peer_endpoint`` as a CurveZMQ server on a ZeroMQ context of its own (whose ZAP handler,
here, accepts only the public keys of the key directory and logs every peer it refuses; a socket
monitor logs peers that fail the handshake before ZAP hears of them). It answers the requests of
snapd.peers.wire: announcements go to the job's part book (snapd.daemon.peer_commits), replicas
to the replica store (snapd.peers.replicas), ``have`` and ``get`` are read from this node's root
and the store. A bad request is answered with an error naming it; nothing a peer sends can make
this daemon write outside its replica store, and every request is its own error boundary.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from snapd.errors import FormatError, InvalidArgument, SnapdError
from snapd.format.global_manifest import GlobalManifest, global_id, parse_any, part_dir
from snapd.format import index as jobindex
from snapd.format.jobdir import JobDir, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, taken_of
from snapd.peers import wire
from snapd.peers.keys import PeerKeys
from snapd.peers.replicas import ReplicaStore

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
HAVE_STEPS = 4  # the newest committed steps of a job a ``have`` reply describes
GONE = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED}  # a handshake's connection closed by the peer


def _int(h: dict, name: str, lo: int = 0) -> int:
    v = h.get(name)
    if type(v) is not int or v < lo:
        raise InvalidArgument(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _str(h: dict, name: str, max_len: int = 256) -> str:
    v = h.get(name)
    if not isinstance(v, str) or len(v) > max_len:
        raise InvalidArgument(f"{name} must be a string of at most {max_len} characters")
    return v


class PeerServer:
    def __init__(self, endpoint: str, node: str, keys: PeerKeys, root: Path, store: ReplicaStore,
                 announce: Callable[[str, int, int, str, int, str, bytes], None]) -> None:
        self.endpoint, self.node, self.keys, self.root, self.store = endpoint, node, keys, root, store
        self._announce = announce
        self.ctx = zmq.Context(io_threads=wire.STREAMS)  # (a peer pulls over several links at once)
        self.refused = 0
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="snapd-peer-server", daemon=True)
        self._zap = self.ctx.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)  # (before the server socket: no peer slips in unchecked)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey, self.sock.curve_publickey = keys.secret, keys.public
        self.sock.setsockopt(zmq.ZAP_DOMAIN, b"snapd-peers")
        self.sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MANIFEST_BYTES + 4096)
        self.sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise InvalidArgument(f"peer_endpoint {endpoint}: cannot bind: {e}") from None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.close()

    def close(self) -> None:
        for s in (self._monitor, self.sock, self._zap):
            s.close(linger=0)
        self.ctx.term()

    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in (self.sock, self._zap, self._monitor):
            poller.register(s, zmq.POLLIN)
        while not self._stop.is_set():
            for s, _ in poller.poll(100):
                try:
                    if s is self._zap:
                        self._authenticate()
                    elif s is self._monitor:
                        self._handshake_failed()
                    else:
                        self._serve_one()
                except Exception:  # a bug of ours must not end the thread: the next request is served
                    log.exception("internal error serving a peer")

    # -- who may talk to us --------------------------------------------------------------
    def _authenticate(self) -> None:
        frames = self._zap.recv_multipart()
        envelope, body = frames[:2], frames[2:]
        request_id = body[1] if len(body) > 1 else b""
        address = body[3].decode(errors="replace") if len(body) > 3 else "?"
        mechanism = body[5] if len(body) > 5 else b""
        key = z85.encode(body[6]) if mechanism == b"CURVE" and len(body) > 6 and len(body[6]) == 32 else None
        if key is not None and key in self.keys.allowed:
            self._zap.send_multipart(envelope + [b"1.0", request_id, b"200", b"OK", b"peer", b""])
            return
        self.refused += 1
        log.warning("refused peer %s: its key %s is not in %s", address,
                    key.decode() if key else f"(mechanism {mechanism.decode(errors='replace')})",
                    self.keys.where)
        self._zap.send_multipart(envelope + [b"1.0", request_id, b"400", b"key not allowed", b"", b""])

    def _handshake_failed(self) -> None:
        event = recv_monitor_message(self._monitor)
        where = event.get("endpoint", b"?")
        where = where.decode(errors="replace") if isinstance(where, bytes) else where
        if event.get("event") == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and event.get("value") in GONE:
            # (the other side closed the connection mid-handshake: a daemon that stopped, or a survey
            # that stopped waiting for this node while it was stopped; not a key refused)
            log.info("a peer went away during the handshake on %s (errno %s)", where, event.get("value"))
            return
        self.refused += 1
        log.warning("refused a peer on %s: the CurveZMQ handshake failed (no key, or not the cluster's "
                    "server key; event %s, errno %s)", where, event.get("event"), event.get("value"))

    # -- requests ------------------------------------------------------------------------
    def _serve_one(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        peer, rest = frames[0].bytes, frames[1:]
        self.requests += 1
        try:
            header, data = wire.decode(rest)
            reply, out = self._handle(header, data)
        except (SnapdError, OSError) as e:
            log.info("a peer's request refused: %s", e)
            reply, out = {"t": "error", "message": str(e)[:2000]}, None
        reply["node"] = self.node  # (the peer learns this node's name: ``snapd status`` shows it)
        self.sock.send_multipart([peer, *wire.encode(reply, out)], copy=False)

    def _handle(self, h: dict, data: memoryview | None) -> tuple[dict, Any]:
        t = h["t"]
        if t in ("announce", "replica", "have", "get", "global"):
            job = wire.check_job_path(h.get("job"))
        if t == "announce":
            if data is None or len(data) > wire.MAX_MANIFEST_BYTES:
                raise InvalidArgument("an announcement carries its part's manifest")
            self._announce(job, _int(h, "step"), _int(h, "world_size", 1), _str(h, "run"), _int(h, "rank"),
                           _str(h, "node"), bytes(data))
            return {"t": "ok"}, None
        if t == "replica":
            return self._replica(job, h, data)
        if t == "have":
            return {"t": "have", "steps": self._have(job, h.get("brief") is True)}, None
        if t == "global":
            return self._global(job, _int(h, "step"), _int(h, "offset"), _int(h, "length"))
        if t == "get":
            return {"t": "data"}, self._get(job, h)
        raise InvalidArgument(f"unknown request {t!r}")

    def _replica(self, job: str, h: dict, data: memoryview | None) -> tuple[dict, Any]:
        step, rank = _int(h, "step"), _int(h, "rank")
        phase = h.get("phase")
        if phase == "begin" and data is not None:
            self.store.begin(job, step, rank, _int(h, "world_size", 1), _str(h, "run"), _str(h, "node"),
                             bytes(data))
        elif phase == "data" and data is not None and len(data) <= wire.MAX_PIECE_BYTES:
            self.store.write(job, step, rank, _str(h, "file"), _int(h, "offset"), data)
        elif phase == "link" and data is None:  # (a file of an incremental part: held here already)
            self.store.link(job, step, rank, _str(h, "file"), _int(h, "from_step"), _str(h, "from_file"))
        elif phase == "end":
            self.store.end(job, step, rank)
        else:
            raise InvalidArgument(f"replica phase {phase!r} (with {'no ' if data is None else ''}bytes)")
        return {"t": "ok"}, None

    def _have(self, job: str, brief: bool = False) -> list[dict]:
        """What this node has of ``job``: its newest committed steps (their global manifests, and
        which parts are on its disk) and the replicas it holds. ``brief``: each global manifest
        named (world size, when taken, a hash of it), not sent: a survey by each rank of a large job
        asks every node, and 4 of its global manifests are MBs each (``global`` brings the one taken)."""
        out: dict[int, dict] = {}
        *user, name = job.split("/")
        jd = JobDir(self.root.joinpath(*user), name)
        history = jobindex.load(jd).history if jd.path.is_dir() else []
        # the newest, as the index orders latest: taken last (a run that went back to an earlier
        # step keeps higher, older steps)
        for entry in sorted(history, key=lambda e: e.order, reverse=True)[:HAVE_STEPS]:
            step, snap = entry.step, jd.path / entry.name
            try:
                raw = read_regular(snap / MANIFEST_NAME)
                m = parse_any(raw, str(snap))
            except (OSError, FormatError):
                continue
            if isinstance(m, GlobalManifest):
                parts = {}
                for n in os.listdir(snap):
                    if n.startswith("rank-") and (snap / n / MANIFEST_NAME).exists():
                        parts[str(int(n[5:]))] = "disk"
                out[step] = {"step": step, "global": None if brief else raw.decode(), "parts": parts}
                if brief:
                    out[step]["named"] = {"world_size": m.world_size, "taken": taken_of(m),
                                          "id": global_id(raw)}
            elif m.part is None:  # a single process's snapshot (its manifest's checksum names it)
                out[step] = {"step": step, "global": None, "parts": {"0": "disk"}, "whole": m.checksum,
                             "taken": taken_of(m)}
        for r in self.store.held(job):
            entry = out.setdefault(r.step, {"step": r.step, "global": None, "parts": {}})
            if r.whole and "whole" not in entry:
                entry["whole"], entry["taken"] = r.checksum, r.taken
            entry["parts"].setdefault(str(r.rank), r.where)
        return [out[s] for s in sorted(out, reverse=True)]

    def _global(self, job: str, step: int, offset: int, length: int) -> tuple[dict, bytes]:
        """Bytes [offset, +length) of the global manifest of ``job``'s committed step ``step`` here,
        with its size (one of a few thousand ranks is past a message's 64 MiB: asked in pieces).
        The asker checks the whole against the hash this node named it by."""
        if length > wire.MAX_PIECE_BYTES:
            raise InvalidArgument(f"global: {length} bytes asked at once, over {wire.MAX_PIECE_BYTES}")
        try:
            fd = os.open(self.root / job / snapshot_name(step) / MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidArgument(f"{job} step {step} is not committed here") from None
        try:
            return {"t": "data", "size": os.fstat(fd).st_size}, os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _get(self, job: str, h: dict) -> bytes | memoryview:
        step, rank, name = _int(h, "step"), _int(h, "rank"), _str(h, "file")
        offset, length = _int(h, "offset"), _int(h, "length")
        if not wire.FILE_RE.fullmatch(name) or length > wire.MAX_PIECE_BYTES:
            raise InvalidArgument(f"get {name!r} of {length} bytes: not a part's file, or over "
                                  f"{wire.MAX_PIECE_BYTES} bytes")
        r = self.store.get(job, step, rank)
        whole = h.get("whole") is True  # (a single process's snapshot: its files in step-N/ itself)
        if r is not None and r.whole == whole:
            return self.store.read(r, name, offset, length)
        path = self.root / job / snapshot_name(step) / ("" if whole else part_dir(rank)) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise InvalidArgument(f"{job} step {step}: rank {rank}'s part is not here") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)
