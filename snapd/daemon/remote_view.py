"""Which steps of a job the remote tier holds committed, as ``snapd status`` shows them beside the
local disks and the peers' replicas (the per-step view of docs/peers.md).

Asking the bucket is a listing (one request per thousand objects), too slow for the status
request's thread and too costly for every status call: the status thread reads the last listing
(``steps``), and asks for a new one when it is older than ``FRESH_S``; the upload thread, which
owns every request to the store, makes it (``refresh``). An upload this daemon commits is added
at once (``committed``). Until a job's first listing, its remote column is unknown (None).
"""

from __future__ import annotations

import logging
import threading
import time

from snapd.errors import RemoteError
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store

log = logging.getLogger(__name__)

FRESH_S = 10.0  # a listing older than this is renewed the next time status asks for it
MAX_JOBS = 64  # listings kept (the jobs status showed last)


class RemoteView:
    def __init__(self, store: Store, wake: threading.Condition) -> None:
        self.store = store
        self._wake = wake  # the upload thread's condition: a listing asked for wakes it
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, frozenset[int]]] = {}  # job -> (listed at, committed steps)
        self._wanted: set[str] = set()

    def steps(self, job: str) -> frozenset[int] | None:
        """(Any thread.) The committed steps of ``job`` (its path under the daemon's root) at the
        last listing, None before the first; an old listing is renewed in the background."""
        with self._lock:
            seen = self._seen.get(job)
            stale = seen is None or time.monotonic() - seen[0] > FRESH_S
            if stale and job not in self._wanted:
                self._wanted.add(job)
                ask = True
            else:
                ask = False
        if ask:
            with self._wake:
                self._wake.notify_all()
        return None if seen is None else seen[1]

    def wanted(self) -> bool:
        with self._lock:
            return bool(self._wanted)

    def committed(self, job: str, step: int) -> None:
        """(The upload thread.) ``step`` of ``job`` was just committed in the bucket by this daemon."""
        with self._lock:
            seen = self._seen.get(job)
            if seen is not None:
                self._seen[job] = (seen[0], seen[1] | {step})

    def forget(self, job: str, step: int) -> None:
        """(The upload thread.) Remote retention removed ``step`` of ``job``."""
        with self._lock:
            seen = self._seen.get(job)
            if seen is not None:
                self._seen[job] = (seen[0], seen[1] - {step})

    def refresh(self) -> None:
        """(The upload thread.) List the bucket for each job a status asked about."""
        with self._lock:
            jobs, self._wanted = sorted(self._wanted), set()
        for job in jobs:
            try:
                steps = frozenset(RemoteJob(self.store, job).steps())
            except RemoteError as e:  # (the uploads report the store's state; keep the last listing)
                log.debug("listing %s for status failed: %s", job, e)
                with self._lock:
                    old = self._seen.get(job)
                    if old is not None:
                        self._seen[job] = (time.monotonic(), old[1])
                continue
            with self._lock:
                self._seen[job] = (time.monotonic(), steps)
                while len(self._seen) > MAX_JOBS:
                    del self._seen[min(self._seen, key=lambda j: self._seen[j][0])]
