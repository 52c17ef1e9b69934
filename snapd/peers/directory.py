"""Who a daemon's peers are: the ``peers`` list of its config, and the daemons that wrote their
endpoint where every node can read it: ``peer_directory`` (any directory every node mounts: the
job's shared root, a home directory) and the remote tier's bucket (``.snapd-peers/`` under its
prefix), whichever the daemon has. Each daemon writes its entry at start and again every
``REPUBLISH_S``; an entry not rewritten for ``STALE_S`` is a daemon gone. Replicas go round a ring:
the daemons sorted by endpoint, each sending to the next ``replicas`` of them on another node.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapd.errors import InvalidArgument, SnapdError
from snapd.peers.wire import check_endpoint

log = logging.getLogger(__name__)

RELOAD_S = 5.0  # how often the directory is read again
REPUBLISH_S = 60.0
STALE_S = 600.0
BUCKET_DIR = ".snapd-peers"


@dataclass(frozen=True, order=True)
class PeerInfo:
    endpoint: str
    node: str


class PeerDirectory:
    def __init__(self, own: str, node: str, peers: tuple[str, ...] = (),
                 directory: Path | None = None, store: Any = None) -> None:
        self.own, self.node, self.directory = own, node, directory
        self.store = store  # (snapd.remote.store.Store: the remote tier's bucket)
        self._listed = [PeerInfo(check_endpoint(e), e) for e in peers]
        self._found: list[PeerInfo] = []
        self._read_at = -RELOAD_S
        self._published = 0.0

    def publish(self) -> None:
        """Write this daemon's entry where the other nodes read it (a file atomically; an object)."""
        entry = json.dumps({"endpoint": self.own, "node": self.node, "at": time.time()})
        self._published = time.monotonic()
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / f"{self.node}.peer"
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(entry)
                os.replace(tmp, path)
            except OSError as e:
                raise InvalidArgument(f"peer_directory {self.directory}: cannot write this daemon's "
                                      f"endpoint: {e.strerror}") from None
        if self.store is not None:
            try:
                self.store.put(self.store.key(BUCKET_DIR, f"{self.node}.peer"), entry.encode())
            except SnapdError as e:  # (the store down now: the next tick writes it again)
                log.warning("this daemon's peer entry is not in the bucket yet: %s", e)

    def tick(self) -> None:
        """Rewrite this daemon's entry when due (the peer server's loop; never raises)."""
        due = time.monotonic() - self._published >= REPUBLISH_S
        if not due or (self.directory is None and self.store is None):
            return
        try:
            self.publish()
        except SnapdError as e:
            log.warning("this daemon's peer entry not rewritten: %s", e)

    def all(self) -> list[PeerInfo]:
        """Every other daemon, sorted by endpoint."""
        now = time.monotonic()
        if (self.directory is not None or self.store is not None) and now - self._read_at >= RELOAD_S:
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
        entries: list[tuple[str, bytes]] = []
        if self.directory is not None:
            try:
                names = [n for n in os.listdir(self.directory) if n.endswith(".peer")]
                for n in names:
                    try:
                        entries.append((n, (self.directory / n).read_bytes()))
                    except OSError:
                        continue
            except OSError as e:
                log.warning("peer_directory %s: cannot list it: %s", self.directory, e.strerror)
                return self._found
        if self.store is not None:
            try:
                for key in self.store.list(self.store.key(BUCKET_DIR) + "/"):
                    if key.endswith(".peer") and (body := self.store.get(key)) is not None:
                        entries.append((key, body))
            except SnapdError as e:
                log.warning("the remote tier's peer entries cannot be read: %s", e)
                return self._found
        out = []
        now = time.time()
        for name, body in entries:
            try:
                d = json.loads(body)
                if now - float(d.get("at", now)) > STALE_S:
                    continue  # (a daemon gone: its entry not rewritten for STALE_S)
                out.append(PeerInfo(check_endpoint(d["endpoint"]), str(d["node"])[:128]))
            except (ValueError, KeyError, TypeError, InvalidArgument) as e:
                log.warning("%s is not a peer's entry (%s): ignored", name, e)
        return out
