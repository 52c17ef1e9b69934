"""The job lock: one writer at a time changes a job's directory (commits, retention, leftovers).

Two layers. Between processes, and between nodes that share the root, an exclusive ``flock(2)``
on the job's ``.lock`` file; flock has no timeout, so it is polled with a non-blocking try and a
jittered backoff. Within a process, a thread lock per lock file in front of it: a node's daemon
delivers the parts of all its local ranks, and a process's threads polling flock against each
other only burn the CPU the holder needs (bench: 1024 simulated ranks on 32 processes spent most
of a commit there). So at most one thread per process polls the flock, and the others queue on
the thread lock, which takes a timeout.

Neither layer is re-entrant: a thread holding the lock must not take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from snapd.errors import LockTimeout

LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold(job_path: Path, timeout_s: float) -> Iterator[None]:
    """Hold the lock of the job at ``job_path`` (``LockTimeout`` after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    inner = _thread_lock(job_path / LOCK_NAME)
    if not inner.acquire(timeout=max(0.0, timeout_s)):
        raise _timeout(job_path, timeout_s)
    try:
        fd = os.open(job_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise _timeout(job_path, timeout_s) from None
                    # jittered: the nodes of a large job deliver their parts at once
                    time.sleep(pause * (0.5 + random.random()))
                    pause = min(pause * 2, 0.05)
            yield
        finally:
            os.close(fd)  # closing releases the flock
    finally:
        inner.release()


def _timeout(job_path: Path, timeout_s: float) -> LockTimeout:
    return LockTimeout(f"{job_path}: another writer held the job lock for more than {timeout_s:.0f} s")


def _thread_lock(path: Path) -> threading.Lock:
    """This process's thread lock for ``path``. (Only spares the CPU: the flock alone keeps two
    threads apart, as each opens the file anew, so a lock dropped from a full table is harmless.)"""
    key = str(path)
    with _table.guard:
        lock = _table.locks.get(key)
        if lock is None:
            if len(_table.locks) >= 4096:  # (a daemon serving many jobs: drop the ones nobody holds)
                for k in [k for k, v in _table.locks.items() if not v.locked()]:
                    del _table.locks[k]
            lock = _table.locks[key] = threading.Lock()
        return lock


class _Table:
    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}


# filled as jobs are locked; a forked child starts a fresh one (the fork may have caught a lock held)
_table = _Table()
os.register_at_fork(after_in_child=lambda: globals().update(_table=_Table()))
