"""Who a daemon's peers are: the ``peers`` list of its config, and, with ``peer_directory`` (any
directory every node mounts: the job's shared root, a home directory), the daemons that wrote
their endpoint there. Replicas go round a ring: the daemons sorted by endpoint, each sending to
the next ``replicas`` of them that run on another node.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from snapd.errors import InvalidArgument
from snapd.peers.wire import check_endpoint

log = logging.getLogger(__name__)

RELOAD_S = 5.0  # how often the directory is read again


@dataclass(frozen=True, order=True)
class PeerInfo:
    endpoint: str
    node: str


class PeerDirectory:
    def __init__(self, own: str, node: str, peers: tuple[str, ...] = (),
                 directory: Path | None = None) -> None:
        self.own, self.node, self.directory = own, node, directory
        self._listed = [PeerInfo(check_endpoint(e), e) for e in peers]
        self._found: list[PeerInfo] = []
        self._read_at = -RELOAD_S

    def publish(self) -> None:
        """Write this daemon's endpoint into the directory (atomically; read by the other nodes)."""
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.node}.peer"
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"endpoint": self.own, "node": self.node}))
            os.replace(tmp, path)
        except OSError as e:
            raise InvalidArgument(f"peer_directory {self.directory}: cannot write this daemon's endpoint: "
                                  f"{e.strerror}") from None

    def all(self) -> list[PeerInfo]:
        """Every other daemon, sorted by endpoint."""
        now = time.monotonic()
        if self.directory is not None and now - self._read_at >= RELOAD_S:
            self._read_at = now
            self._found = self._read()
        seen = {p.endpoint: p for p in self._listed}
        seen.update({p.endpoint: p for p in self._found})
        seen.pop(self.own, None)
        return sorted(seen.values())

    def replica_targets(self, count: int) -> list[PeerInfo]:
        """The next ``count`` daemons after this one round the ring, each on another node."""
        ring = sorted([*self.all(), PeerInfo(self.own, self.node)])
        at = ring.index(PeerInfo(self.own, self.node))
        out: list[PeerInfo] = []
        for p in ring[at + 1:] + ring[:at]:
            if len(out) == count:
                break
            if p.node != self.node:
                out.append(p)
        return out

    def _read(self) -> list[PeerInfo]:
        out = []
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(".peer")]  # type: ignore[arg-type]
        except OSError as e:
            log.warning("peer_directory %s: cannot list it: %s", self.directory, e.strerror)
            return self._found
        for n in names:
            try:
                d = json.loads((self.directory / n).read_text())  # type: ignore[operator]
                out.append(PeerInfo(check_endpoint(d["endpoint"]), str(d["node"])[:128]))
            except (OSError, ValueError, KeyError, TypeError, InvalidArgument) as e:
                log.warning("peer_directory: %s is not a peer's entry (%s): ignored", n, e)
        return out
