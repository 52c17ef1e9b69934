"""The remote tier's upload thread: every snapshot committed locally is uploaded behind the
training job's back (snapd.remote.remote_job), one snapshot at a time, its parts in parallel.

Order: emergency snapshots first, then the newest: after an outage the resume point goes up
before the backlog. The backlog is bounded (``remote_backlog``): past it the oldest snapshot that
is neither the best nor an emergency one is skipped, with a log line. A failed upload stays in the
backlog and is retried with a growing pause (up to ``MAX_RETRY_S``); the last error shows in
``snapd status``. Memory: ``remote_threads`` parts of 16 MiB in flight; bandwidth: at most
``remote_bytes_per_s``.

Local retention leaves a snapshot in place while it waits here (``held``); after its upload, the
local and the remote retention run (snapd.daemon.upload_retention).

This thread owns the backlog and the counters; the server thread reads ``status()`` (a copy under
the lock) and the flush and rank-commit threads call ``add``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from snapd.daemon.config import DaemonConfig
from snapd.daemon import upload_retention
from snapd.daemon.upload_retention import Upload
from snapd.daemon.rank_commits import Waiting
from snapd.daemon.remote_parts import PartUploads
from snapd.daemon.remote_view import RemoteView
from snapd.errors import RemoteError, SnapdError
from snapd.format import index as jobindex
from snapd.format.root_jobs import job_dirs
from snapd.format.retention import Retention
from snapd.remote.bandwidth import Pacer
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store

log = logging.getLogger(__name__)

MAX_RETRY_S = 30.0
GIVE_UP_AFTER = 3  # failed attempts in a row after which a drain no longer waits for the store


class Yielded(Exception):
    """An upload abandoned for an emergency snapshot's (it is tried again after)."""


class Uploader:
    def __init__(self, config: DaemonConfig) -> None:
        assert config.remote is not None
        self.config = config
        self.store = Store.open(config.remote, endpoint_url=config.endpoint_url,
                                threads=config.remote_threads)
        self._pool = ThreadPoolExecutor(config.remote_threads, thread_name_prefix="snapd-upload",
                                        initializer=_background)
        self._pace = Pacer(config.remote_bytes_per_s).take if config.remote_bytes_per_s else None
        self._lock = threading.Condition()
        self._backlog: dict[Path, Upload] = {}
        self._busy: Upload | None = None
        self._stop = False
        # after a failure the store is let be for a while (growing, up to MAX_RETRY_S): every upload
        # waits, so once it answers again the newest snapshot is the first to go up
        self._paused_until = 0.0
        self._failures = 0
        self._cleaned: set[str] = set()  # job prefixes whose stale multipart uploads are aborted
        self.counts = {"uploaded": 0, "uploaded_bytes": 0, "failures": 0, "skipped": 0, "seconds": 0.0}
        self.last_error: tuple[float, str] | None = None
        self.parts = PartUploads(self.store, self.remote_job, self._pool, self._pace_part)
        self.view = RemoteView(self.store, self._lock)  # what status shows as the remote column
        self._thread = threading.Thread(target=self._run, name="snapd-upload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- called by the flush and rank-commit threads --------------------------------------------
    def remote_job(self, root: Path, job: str) -> str:
        """Where ``job`` of ``root`` lives under the remote prefix (a user's root keeps its name)."""
        return (root.relative_to(self.config.root) / job).as_posix()

    def url_of(self, jobs_root: Path) -> str:
        """The bucket's place for the jobs of ``jobs_root`` (a client's, told in ``welcome``)."""
        rel = jobs_root.relative_to(self.config.root).as_posix()
        return self.store.url if rel == "." else f"{self.store.url}/{rel}"

    def add(self, root: Path, job: str, path: Path, step: int, emergency: bool, stored_bytes: int,
            retention: Retention, rank: int | None) -> None:
        with self._lock:
            u = self._backlog.get(path)
            if u is not None and u.step == step and u is not self._busy:
                if u.ranks is not None and rank is not None:
                    u.ranks.add(rank)
                u.emergency |= emergency
            else:  # (one going up now may have read an older version of this step: this one goes too)
                self._backlog[path] = Upload(root, job, path, step, emergency, stored_bytes, retention,
                                             None if rank is None else {rank})
            self._bound()
            self._lock.notify_all()

    def add_part(self, w: Waiting) -> None:
        """A rank's part that has waited for its global snapshot for a while (snapd.daemon.remote_parts)."""
        self.parts.add(w)
        with self._lock:
            self._lock.notify_all()

    def _pace_part(self, n: int) -> None:
        if self._pace is not None:
            self._pace(n)

    def held(self, job_path: Path, next_bytes: int = 0) -> frozenset[str]:
        """The snapshots of this job still waiting for their upload (snapd.daemon.upload_retention)."""
        with self._lock:
            waiting = [u for u in self._backlog.values() if u.path.parent == job_path]
        return upload_retention.hold(waiting, job_path, next_bytes)

    def wait_not_uploading(self, path: Path, timeout_s: float) -> bool:
        """Until snapshot ``path`` is not going up (a user removed it: snapd.daemon.removals); polled."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy is not None and self._busy.path == path and time.monotonic() < deadline:
                self._lock.wait(0.1)
            return self._busy is None or self._busy.path != path

    def _bound(self) -> None:
        while len(self._backlog) > self.config.remote_backlog:
            victims = [u for u in self._backlog.values() if not u.emergency and u is not self._busy
                       and not upload_retention.is_best(u)]
            if not victims:
                return
            v = min(victims, key=lambda u: (u.since, u.step))
            del self._backlog[v.path]
            self.counts["skipped"] += 1
            log.warning("remote backlog full (%d snapshots): %s step %d is not uploaded (%s)",
                        self.config.remote_backlog, v.job, v.step, v.path)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            waiting = list(self._backlog.values())
            return {"remote": self.store.url, "backlog": len(waiting),
                    "backlog_bytes": sum(u.stored_bytes for u in waiting),
                    "oldest_s": round(time.time() - min(u.since for u in waiting), 1) if waiting else 0.0,
                    "uploading": f"{self._busy.job} step {self._busy.step}" if self._busy else None,
                    "last_error": self.last_error[1] if self.last_error else None,
                    "last_error_age_s":
                        round(time.time() - self.last_error[0], 1) if self.last_error else None,
                    **self.counts}

    def idle(self) -> bool:
        with self._lock:
            return not self._backlog

    def unreachable(self) -> bool:
        """The store failed the last ``GIVE_UP_AFTER`` attempts in a row (a drain stops waiting)."""
        with self._lock:
            return self._failures >= GIVE_UP_AFTER

    def unfinished(self) -> list[str]:
        with self._lock:
            return [f"{u.job} step {u.step}{' (emergency)' if u.emergency else ''}: {u.path}"
                    for u in sorted(self._backlog.values(), key=self._order, reverse=True)]

    # -- the thread ------------------------------------------------------------------------------
    @staticmethod
    def _order(u: Upload) -> tuple:
        return (u.emergency, u.since, u.step)

    def _next(self) -> Upload | None:
        """The upload to make now; None when it is time to tend the waiting parts (or to stop)."""
        with self._lock:
            while not self._stop:
                wait = self._paused_until - time.monotonic()
                if self._backlog and wait <= 0:
                    self._busy = max(self._backlog.values(), key=self._order)
                    return self._busy
                look = self.parts.wait_s()
                if look is not None and look <= 0 or self.view.wanted():
                    return None
                waits = [t for t in (wait if self._backlog else None, look) if t is not None]
                self._lock.wait(timeout=min(waits) if waits else None)
            return None

    def _before_send(self, u: Upload, n: int) -> None:
        """Before each part: an emergency snapshot that came meanwhile goes first (this upload is
        abandoned, its multipart upload aborted, and it stays in the backlog); then the bound."""
        if not u.emergency:
            with self._lock:
                if any(w.emergency for w in self._backlog.values()):
                    raise Yielded(f"{u.job} step {u.step} yields to an emergency snapshot")
        if self._pace is not None:
            self._pace(n)

    def _resume(self) -> None:
        """The latest snapshot of each job under the root goes up (again) at start: one a stopped or
        killed daemon had not uploaded is uploaded now; one that is there already costs one GET."""
        for jd in job_dirs(self.config.root):
            try:
                latest = jobindex.load(jd).latest
            except (OSError, SnapdError) as e:
                log.warning("%s: not looked at for uploads: %s", jd.path, e)
                continue
            if latest is not None:
                self.add(jd.root, jd.job, jd.path / latest.name, latest.step, latest.emergency,
                         latest.stored_bytes, Retention(keep_last=None), None)

    def _run(self) -> None:
        _background()
        try:  # (here, not in start: a bucket that hangs must not hold up the daemon's start)
            self.store.check()
        except SnapdError as e:  # local snapshots go on; the error shows until an upload succeeds
            self._error(str(e))
        self._resume()
        while not self._stop:
            self.parts.tend()
            self.view.refresh()
            u = self._next()
            if u is None:
                continue
            try:
                self._upload(u)
            except Yielded as e:
                log.info("%s", e)
                with self._lock:
                    self._busy = None
            except RemoteError as e:  # the store: everything waits (then the newest goes first)
                self._failed(u, str(e), drop=False)
            except (OSError, SnapdError) as e:  # this snapshot's own files: it cannot go up
                self._failed(u, f"{e} (not uploaded)", drop=True)
            except Exception as e:  # a bug of ours: logged with its traceback, the snapshot kept
                log.exception("upload of %s step %d failed", u.job, u.step)
                self._failed(u, f"{type(e).__name__}: {e}", drop=u.attempts >= 3)

    def _failed(self, u: Upload, message: str, drop: bool) -> None:
        with self._lock:
            u.attempts += 1
            self.counts["failures"] += 1
            self._busy = None
            self._failures += 1
            self._paused_until = time.monotonic() + min(MAX_RETRY_S, 0.25 * 2 ** self._failures)
            if drop and self._backlog.get(u.path) is u:
                del self._backlog[u.path]
        self._error(f"{u.job} step {u.step}: {message}")

    def _error(self, message: str) -> None:
        with self._lock:
            self.last_error = (time.time(), message)
        log.error("remote tier: %s", message)

    def _upload(self, u: Upload) -> None:
        rjob = RemoteJob(self.store, self.remote_job(u.root, u.job))
        if rjob.key("") not in self._cleaned:  # a killed daemon's multipart uploads
            self.store.abort_stale(rjob.key("") + "/")
            self._cleaned.add(rjob.key(""))
        t0 = time.monotonic()
        if not u.path.is_dir():  # (removed locally meanwhile: retention forced by space, a user)
            log.warning("%s step %d is gone locally before its upload: %s", u.job, u.step, u.path)
            with self._lock:
                self._busy = None
                self._backlog.pop(u.path, None)
                self.counts["skipped"] += 1
            return
        committed = rjob.upload(u.path, sorted(u.ranks) if u.ranks is not None else None, self._pool,
                                lambda n: self._before_send(u, n))
        took = time.monotonic() - t0
        if committed:
            self.view.committed(rjob.job, u.step)
        log.info("uploaded %s step %d to %s in %.2f s%s", u.job, u.step, rjob.where(u.path.name), took,
                 "" if committed else " (its global snapshot waits for other nodes' parts)")
        # (before the upload counts as done: a status that says nothing waits shows the bucket after
        # its retention too; the local hold without this one, uploaded now)
        upload_retention.retire(u, rjob, self.held(u.path.parent) - {u.path.name},
                                self.config.remote_keep_last, self.config.remote_keep_every_steps, self.view)
        with self._lock:
            self._busy = None
            if self._backlog.get(u.path) is u:
                del self._backlog[u.path]
            self.counts["uploaded"] += committed
            self.counts["uploaded_bytes"] += u.stored_bytes
            self.counts["seconds"] += took
            self.last_error = None
            self._failures = 0

def _background() -> None:
    """This thread yields the CPU to the flush and encode threads (the next local snapshot) and to
    the training job: uploads are behind both (nice 10, this thread only)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass
