"""The daemon's account of itself: ``snapd status`` (docs/PROTOCOL.md, a stable
schema) and the one line systemd shows as STATUS=."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from snapd import __version__

if TYPE_CHECKING:
    from snapd.daemon.server import Server

WINDOW_S = 60.0  # "recent" throughput: snapshots persisted within the last minute


class Recent:
    """Per-job outcomes and the persisted bytes of the last ``WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._window: collections.deque[tuple[float, int, int]] = collections.deque()
        self.jobs: dict[str, dict[str, Any]] = {}

    def _job(self, job: str, job_dir: str) -> dict[str, Any]:
        return self.jobs.setdefault(job_dir, {"job": job, "dir": job_dir, "persisted": 0, "failed": 0,
                                              "last_step": None, "last_persisted_at": None})

    def persisted(self, job: str, job_dir: str, step: int, raw: int, stored: int) -> None:
        now = time.time()
        self._window.append((now, raw, stored))
        j = self._job(job, job_dir)
        j["persisted"] += 1
        j["last_step"], j["last_persisted_at"] = step, round(now, 3)

    def failed(self, job: str, job_dir: str) -> None:
        self._job(job, job_dir)["failed"] += 1

    def throughput(self) -> dict[str, Any]:
        cutoff = time.time() - WINDOW_S
        while self._window and self._window[0][0] < cutoff:
            self._window.popleft()
        return {"window_s": WINDOW_S, "snapshots": len(self._window),
                "raw_bytes_per_s": round(sum(w[1] for w in self._window) / WINDOW_S),
                "stored_bytes_per_s": round(sum(w[2] for w in self._window) / WINDOW_S)}


def status_line(server: Server) -> str:
    """One line for systemd's STATUS= (shown by systemctl status)."""
    c, pool = server.counters, server.pool
    return (f"{len(server.sessions)} clients, {len(server.tasks)} snapshots in flight, "
            f"{c['persisted']} persisted ({c['bytes_stored'] >> 20} MiB), {c['failed']} failed; "
            f"{len(pool.buffers)} host buffers, {pool.total() >> 20} MiB")


def _last_snapshot(last: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy (its ``bytes`` are the layout's, shared by every snapshot of it)."""
    return None if last is None else {**last, "bytes": dict(last["bytes"])}


def _mine(viewer: Any, server: Server) -> Callable[[str], bool]:
    """Whether a job directory is ``viewer``'s: under its per-user directory (with shared
    directories off, no job is attributed to a user)."""
    if not server.policy.user_dirs:
        return lambda path: False
    own = str(server.config.root / viewer.user) + os.sep
    return lambda path: path.startswith(own)


def status_of(server: Server, viewer: Any = None) -> dict[str, Any]:
    """Everything for root and the daemon's own uid (and in-process callers: ``viewer`` None); for
    any other user, their own clients and jobs, and figures summed over everyone."""
    full = _status(server)
    if viewer is None or viewer.uid in (0, os.geteuid()):
        return full
    mine = _mine(viewer, server)
    full["clients"] = [c for c in full["clients"] if c["uid"] == viewer.uid]
    full["jobs"] = [j for j in full["jobs"] if mine(j["dir"])]
    full["codecs"] = {k: v for k, v in full["codecs"].items() if mine(str(server.config.root / k))}
    full["access"] = {**full["access"], "uids": [viewer.uid], "gids": []}
    full["last_error"] = ""  # (it names another user's job and path as readily as one's own)
    return full


def _status(server: Server) -> dict[str, Any]:
    config, pool = server.config, server.pool
    by_state = collections.Counter(t.state for t in server.tasks.values())
    return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - server.started, 3),
            "endpoint": config.endpoint, "root": str(config.root), "stopping": server.stopping,
            "backend": server.backend, "metrics": server.metrics.url,
            "cuda_devices": server.gpu.describe() if server.gpu is not None else [],
            "cuda_devices_in_use": sorted(server.gpu.devices) if server.gpu is not None else [],
            "cuda_devices_skipped": dict(server.gpu.skipped) if server.gpu is not None else {},
            "clients": [{"pid": s.pid, "uid": s.uid, "job": s.job, "jobs_root": str(s.jobs_root),
                         "held_buffers": server.leases.held(s),
                         "last_snapshot": _last_snapshot(s.last_snapshot)} for s in server.sessions.values()],
            "access": server.policy.describe(),
            "in_flight": dict(by_state), "waiting_for_buffer": len(server.leases.waiters),
            "buffers": {"count": len(pool.buffers), "bytes_each": config.host_buffer_bytes,
                        "sizes": [b.size for b in pool.buffers], "max_bytes_each": config.buffer_cap,
                        "max_bytes": config.memory_cap,
                        "busy": sum(b.lease is not None for b in pool.buffers)},
            "codecs": {os.path.relpath(key, config.root): {"codec": c.codec, "reason": c.reason}
                       for key, c in server.pipeline.choices.items()},
            "jobs": sorted(server.recent.jobs.values(), key=lambda j: j["dir"]),
            "throughput": server.recent.throughput(),
            "counters": dict(server.counters), "last_error": server.last_error}
