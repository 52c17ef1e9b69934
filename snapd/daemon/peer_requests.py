"""The requests of this node's clients that reach beyond its root, to the daemons of other nodes
(docs/peers.md): ``locate``, ``fetch_part`` and ``peers``, what a hello starts (a replacement
node's part brought early) and what its welcome says of the peers. The server thread calls these
with the client's session; a daemon without peers answers them as its root is all there is."""

from __future__ import annotations

from typing import Any

from snapd import protocol
from snapd.daemon.peers import Peers
from snapd.daemon.sessions import Session
from snapd.errors import ProtocolError
from snapd.format.jobdir import JobDir


class PeerRequests:
    def __init__(self, peers: Peers | None) -> None:
        self.peers = peers

    def welcome(self) -> dict[str, Any]:
        """``peers``: whether there are any; ``peer``: where they reach this daemon (its job's ranks
        tell each other's daemons: client/group_peers.py)."""
        if self.peers is None:
            return {"peers": False, "peer": None}
        return {"peers": True, "peer": {"endpoint": self.peers.directory.own, "node": self.peers.node}}

    def hello(self, s: Session) -> None:
        if self.peers is not None:  # (a replacement node: its part, or its snapshot, early)
            self.peers.hello(JobDir(s.jobs_root, s.job), s.retention, s.rank, s.world_size)

    def locate(self, s: Session, msg: dict, peer: bytes) -> bytes | None:
        if self.peers is None:  # (its root is all there is)
            return protocol.message("located", msg["id"], step=None)
        self.peers.locate(JobDir(s.jobs_root, s.job), msg.get("step"), s.retention, peer, msg["id"])
        return None  # (answered from the peers' pool: it waits on other nodes)

    def fetch_part(self, s: Session, msg: dict, peer: bytes) -> bytes | None:
        if self.peers is None:
            raise ProtocolError("this daemon has no peers: its snapshots' parts are all on its root",
                                "no_peers")
        self.peers.fetch_part(JobDir(s.jobs_root, s.job), msg["step"], msg["rank"], peer, msg["id"])
        return None

    def learn(self, s: Session, msg: dict) -> bytes:
        """The job's daemons, as its ranks found them through its process group."""
        if self.peers is None:
            raise ProtocolError("this daemon has no peers (no peer_endpoint): it cannot reach its job's "
                                "other daemons", "no_peers")
        known = self.peers.learn(JobDir(s.jobs_root, s.job), s.uid, s.retention, s.rank, s.world_size,
                                 msg["peers"], msg["complete"])
        return protocol.message("peers_known", msg["id"], peers=known)
