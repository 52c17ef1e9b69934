"""How much one client, and one user, may hold of the host buffers: past a limit, that client's next
snapshot waits (or is skipped) while the other clients go on. ``client_max_in_flight`` counts
buffers, ``client_buffer_bytes`` and ``user_buffer_bytes`` their sizes (grown ones as grown); an
emergency snapshot may hold one buffer more and is not bound by the user's share.
"""

from __future__ import annotations

from snapd.daemon.buffers import BufferPool
from snapd.daemon.config import DaemonConfig
from snapd.daemon.sessions import Session
from snapd.daemon.tasks import TaskTable


class Limits:
    """``sessions`` and ``tasks`` are the server's (read here, never changed)."""

    def __init__(self, config: DaemonConfig, pool: BufferPool, sessions: dict[bytes, Session],
                 tasks: TaskTable, shared: bool) -> None:
        self.config, self.pool, self.sessions, self.tasks = config, pool, sessions, tasks
        # every connection of a uid together: by default half the buffers' memory when users share the daemon
        self.user_cap = config.user_buffer_bytes if config.user_buffer_bytes is not None or not shared \
            else max(config.memory_cap // 2, config.host_buffer_bytes)

    def held(self, s: Session) -> int:
        """Host buffers ``s`` holds: granted, or carrying one of its snapshots not yet persisted."""
        return len(s.leases) + len(self.tasks.of(s.peer))

    def held_bytes(self, s: Session) -> int:
        """The sizes of the host buffers ``s`` holds (grown ones count as grown)."""
        leases = [*s.leases, *(t.lease for t in self.tasks.of(s.peer))]
        return sum(b.size for b in map(self.pool.by_lease, leases) if b is not None)

    def reached(self, s: Session, emergency: bool = False) -> str:
        """The limit ``s`` has reached ('' if none): it waits until one of its snapshots ends.
        An emergency snapshot may hold one buffer more: it must not wait for the flushes before it."""
        c = self.config
        if c.client_max_in_flight is not None and self.held(s) >= c.client_max_in_flight + emergency:
            return f"client_max_in_flight = {c.client_max_in_flight} buffer(s)"
        if c.client_buffer_bytes is not None:  # one more buffer, at least the starting size, would pass it
            held = self.held_bytes(s)
            if held and held + c.host_buffer_bytes > c.client_buffer_bytes:
                return f"client_buffer_bytes = {c.client_buffer_bytes}, holding {held}"
        if self.user_cap is not None and not emergency:  # every connection of the uid together
            held = sum(self.held_bytes(x) for x in self.sessions.values() if x.uid == s.uid)
            if held and held + c.host_buffer_bytes > self.user_cap:
                return f"user_buffer_bytes = {self.user_cap}: the clients of uid {s.uid} hold {held}"
        return ""
