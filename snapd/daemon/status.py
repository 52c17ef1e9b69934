"""The daemon's account of itself: ``snapd status`` (docs/PROTOCOL.md, a stable
schema) and the one line systemd shows as STATUS=."""

from __future__ import annotations

import collections
import os
import time
from typing import TYPE_CHECKING, Any

from snapd import __version__

if TYPE_CHECKING:
    from snapd.daemon.server import Server


def status_line(server: Server) -> str:
    """One line for systemd's STATUS= (shown by systemctl status)."""
    c = server.counters
    return (f"{len(server.sessions)} clients, {len(server.tasks)} snapshots in flight, "
            f"{c['persisted']} persisted ({c['bytes_stored'] >> 20} MiB), {c['failed']} failed")


def status_of(server: Server) -> dict[str, Any]:
    config, pool = server.config, server.pool
    by_state = collections.Counter(t.state for t in server.tasks.values())
    return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - server.started, 3),
            "endpoint": config.endpoint, "root": str(config.root), "stopping": server.stopping,
            "backend": server.backend, "metrics": server.metrics.url,
            "clients": [{"pid": s.pid, "uid": s.uid, "job": s.job, "jobs_root": str(s.jobs_root),
                         "held_buffers": server.held(s)} for s in server.sessions.values()],
            "access": server.policy.describe(),
            "in_flight": dict(by_state), "waiting_for_buffer": len(server.waiters),
            "buffers": {"count": len(pool.buffers), "bytes_each": config.host_buffer_bytes,
                        "busy": sum(b.lease is not None for b in pool.buffers)},
            "codecs": {job: {"codec": c.codec, "reason": c.reason} for job, c in server.pipeline.choices.items()},
            "counters": dict(server.counters), "last_error": server.last_error}
