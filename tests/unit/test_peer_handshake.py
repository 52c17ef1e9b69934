"""The peer server's account of failed handshakes (issue 26's security): a peer without the
cluster's key is refused and warned about; a connection closed mid-handshake is not a refusal (a
TCP health probe of the peer port, a daemon that stopped, a survey that stopped waiting for this
node while it hung), and is logged at info only."""

from __future__ import annotations

import logging
import socket
import struct
import time

import zmq

from snapd.daemon.peer_server import PeerServer
from snapd.peers.keys import PeerKeys, create
from snapd.peers.replicas import ReplicaStore


def _until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def test_a_connection_closed_mid_handshake_is_not_a_refused_peer(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="snapd.daemon.peer_server")
    create(tmp_path / "k")
    create(tmp_path / "other")
    server = PeerServer("tcp://127.0.0.1:0", "n", PeerKeys.load(tmp_path / "k"), tmp_path, ReplicaStore(0),
                        lambda *a: None)
    server.start()
    ep = server.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    ctx = zmq.Context()
    try:
        for reset in (False, True):  # (a probe that closes, one that resets)
            s = socket.create_connection(("127.0.0.1", int(ep.rsplit(":", 1)[1])))
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        assert _until(lambda: caplog.text.count("a peer went away during the handshake") == 2), caplog.text
        assert server.refused == 0 and "refused a peer" not in caplog.text
        other = PeerKeys.load(tmp_path / "other")  # (another cluster's key: refused, and said so)
        c = ctx.socket(zmq.DEALER)
        c.curve_secretkey, c.curve_publickey, c.curve_serverkey = other.secret, other.public, other.public
        c.linger = 0
        c.connect(ep)
        c.send(b"{}")
        assert _until(lambda: server.refused >= 1), caplog.text
        assert any(r.levelno == logging.WARNING and "refused" in r.getMessage() for r in caplog.records)
        c.close()
    finally:
        server.stop()
        ctx.term()
