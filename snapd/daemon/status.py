"""The daemon's account of itself: its tallies, ``snapd status`` (docs/PROTOCOL.md, a stable
schema) and the one line systemd shows as STATUS=."""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from snapd import __version__
from snapd.daemon.access import AccessPolicy
from snapd.daemon.buffers import BufferPool
from snapd.daemon.config import DaemonConfig
from snapd.daemon.leases import Leases
from snapd.daemon.metrics import Metrics
from snapd.daemon.pipeline import Pipeline
from snapd.daemon.sessions import Session
from snapd.daemon.tasks import Task, TaskTable

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # "recent" throughput: snapshots persisted within the last minute


class Recent:
    """Per-job outcomes and the persisted bytes of the last ``WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._window: collections.deque[tuple[float, int, int]] = collections.deque()
        self.jobs: dict[str, dict[str, Any]] = {}

    def _job(self, job: str, job_dir: str) -> dict[str, Any]:
        return self.jobs.setdefault(job_dir, {"job": job, "dir": job_dir, "persisted": 0, "failed": 0,
                                              "last_step": None, "last_persisted_at": None,
                                              "last_persist_s": None, "last_emergency_s": None,
                                              "last_emergency_grace_s": None})

    def persisted(self, job: str, job_dir: str, step: int, raw: int, stored: int, seconds: float,
                  emergency: bool, grace_s: float | None = None) -> None:
        """``seconds``: from its hand-over to persisted (an emergency one's is what a preemption's
        grace must cover: docs/clusters.md)."""
        now = time.time()
        self._window.append((now, raw, stored))
        j = self._job(job, job_dir)
        j["persisted"] += 1
        j["last_step"], j["last_persisted_at"], j["last_persist_s"] = step, round(now, 3), round(seconds, 3)
        if emergency:
            j["last_emergency_s"], j["last_emergency_grace_s"] = round(seconds, 3), grace_s
            if grace_s is not None and seconds > grace_s:
                log.error("%s step %d: the emergency snapshot took %.2f s, but the scheduler gave %.1f s "
                          "before its kill: the signal's time is too short for this state (give it at least "
                          "%.0f s: docs/clusters.md)", job, step, seconds, grace_s, max(60.0, 3 * seconds))

    def failed(self, job: str, job_dir: str) -> None:
        self._job(job, job_dir)["failed"] += 1

    def throughput(self) -> dict[str, Any]:
        cutoff = time.time() - WINDOW_S
        while self._window and self._window[0][0] < cutoff:
            self._window.popleft()
        return {"window_s": WINDOW_S, "snapshots": len(self._window),
                "raw_bytes_per_s": round(sum(w[1] for w in self._window) / WINDOW_S),
                "stored_bytes_per_s": round(sum(w[2] for w in self._window) / WINDOW_S)}


class Tally:
    """What became of the snapshots: counters, the last error, each job's outcomes, and metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.counters = {"persisted": 0, "failed": 0, "skipped": 0, "bytes_raw": 0, "bytes_stored": 0}
        self.last_error = ""
        self.recent = Recent()

    def skipped(self) -> None:
        self.counters["skipped"] += 1
        self.metrics.snapshots.labels("skipped").inc()

    def persisted(self, task: Task, stored: int, seconds: float) -> None:
        self.counters["persisted"] += 1
        self.counters["bytes_raw"] += task.raw_bytes
        self.counters["bytes_stored"] += stored
        self.metrics.persisted(task.raw_bytes, stored, seconds)
        self.recent.persisted(task.job, task.key, task.step, task.raw_bytes, stored, seconds, task.emergency,
                              task.grace_s)

    def failed(self, task: Task, message: str) -> None:
        self.counters["failed"] += 1
        self.metrics.snapshots.labels("failed").inc()
        self.recent.failed(task.job, task.key)
        self.last_error = f"{task.job} step {task.step}: {message}"


def _last_snapshot(last: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy (its ``bytes`` are the layout's, shared by every snapshot of it)."""
    return None if last is None else {**last, "bytes": dict(last["bytes"])}


class Status:
    """``snapd status`` and STATUS=, read from the daemon's parts (server thread)."""

    def __init__(self, config: DaemonConfig, policy: AccessPolicy, pool: BufferPool, leases: Leases,
                 pipeline: Pipeline, sessions: dict[bytes, Session], tasks: TaskTable, tally: Tally) -> None:
        self.config, self.policy, self.pool, self.leases = config, policy, pool, leases
        self.pipeline, self.sessions, self.tasks, self.tally = pipeline, sessions, tasks, tally
        self.started = time.time()
        self.backend = "cpu"
        self.gpu: Any = None  # snapd.daemon.gpu_copy.GpuCopier on the GPU path

    def line(self) -> str:
        """One line for systemd's STATUS= (shown by systemctl status)."""
        c, pool = self.tally.counters, self.pool
        return (f"{len(self.sessions)} clients, {len(self.tasks)} snapshots in flight, "
                f"{c['persisted']} persisted ({c['bytes_stored'] >> 20} MiB), {c['failed']} failed; "
                f"{len(pool.buffers)} host buffers, {pool.total() >> 20} MiB")

    def _mine(self, viewer: Any) -> Callable[[str], bool]:
        """Whether a job directory is ``viewer``'s: under its per-user directory (with shared
        directories off, no job is attributed to a user)."""
        if not self.policy.user_dirs:
            return lambda path: False
        own = str(self.config.root / viewer.user) + os.sep
        return lambda path: path.startswith(own)

    def of(self, viewer: Any = None, stopping: bool = False) -> dict[str, Any]:
        """Everything for root and the daemon's own uid (and in-process callers: ``viewer`` None); for
        any other user, their own clients and jobs, and figures summed over everyone."""
        full = self._status(stopping)
        if viewer is None or viewer.uid in (0, os.geteuid()):
            return full
        mine = self._mine(viewer)
        full["clients"] = [c for c in full["clients"] if c["uid"] == viewer.uid]
        full["jobs"] = [j for j in full["jobs"] if mine(j["dir"])]
        full["rank_commits"] = [w for w in full["rank_commits"] if mine(w["dir"])]
        full["codecs"] = {k: v for k, v in full["codecs"].items() if mine(str(self.config.root / k))}
        full["access"] = {**full["access"], "uids": [viewer.uid], "gids": []}
        full["last_error"] = ""  # (it names another user's job and path as readily as one's own)
        if full["remote"] is not None:
            error = "an error (root sees which)" if full["remote"]["last_error"] else None
            full["remote"] = {**full["remote"], "uploading": None, "last_error": error}
        if full["peers"] is not None:  # (other users' jobs and the peers' errors are not theirs to see)
            full["peers"] = {**full["peers"], "jobs": {k: v for k, v in full["peers"]["jobs"].items()
                                                       if mine(str(self.config.root / k))},
                             "peers": [{**p, "last_error": None, "replicated_steps": {}}
                                       for p in full["peers"]["peers"]]}
        return full

    def _status(self, stopping: bool) -> dict[str, Any]:
        config, pool, gpu, tally = self.config, self.pool, self.gpu, self.tally
        return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
                "endpoint": config.endpoint, "root": str(config.root), "stopping": stopping,
                "backend": self.backend, "metrics": tally.metrics.url,
                "cuda_devices": gpu.describe() if gpu is not None else [],
                "cuda_devices_in_use": gpu.in_use() if gpu is not None else [],
                "cuda_devices_skipped": dict(gpu.skipped) if gpu is not None else {},
                "clients": [{"pid": s.pid, "uid": s.uid, "job": s.job, "jobs_root": str(s.jobs_root),
                             "rank": s.rank, "world_size": s.world_size,
                             "held_buffers": self.leases.limits.held(s),
                             "last_snapshot": _last_snapshot(s.last_snapshot)}
                            for s in self.sessions.values()],
                "access": self.policy.describe(),
                "in_flight": self.tasks.by_state(), "waiting_for_buffer": len(self.leases.waiters),
                "buffers": {"count": len(pool.buffers), "bytes_each": config.host_buffer_bytes,
                            "sizes": [b.size for b in pool.buffers], "max_bytes_each": config.buffer_cap,
                            "max_bytes": config.memory_cap,
                            "busy": sum(b.lease is not None for b in pool.buffers)},
                "codecs": {os.path.relpath(key, config.root): {"codec": c.codec, "reason": c.reason}
                           for key, c in self.pipeline.codec_choices().items()},
                "jobs": sorted(tally.recent.jobs.values(), key=lambda j: j["dir"]),
                "throughput": tally.recent.throughput(),
                "counters": dict(tally.counters), "last_error": tally.last_error,
                "rank_commits": self.pipeline.commits.status(),
                "remote": self.pipeline.uploads.status() if self.pipeline.uploads is not None else None,
                "peers": self._peers()}

    def _peers(self) -> dict | None:
        """The peers' section, each step's remote column from the uploads' last listing (True: the
        bucket holds it committed; None: not listed yet, or no remote tier)."""
        if self.pipeline.peers is None:
            return None
        out = self.pipeline.peers.status()
        uploads = self.pipeline.uploads
        for job, steps in out["jobs"].items():
            listed = uploads.view.steps(job) if uploads is not None else None
            for step, w in steps.items():
                w["remote"] = None if listed is None else int(step) in listed
                w["complete"] = w["complete"] or bool(w["remote"])
        return out
