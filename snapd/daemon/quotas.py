"""Per-user disk quotas: how much of the snapshot root each user's snapshots may take.

The daemon writes every user's files, so a filesystem quota on a user cannot apply to them: one
user's snapshots could fill the disk and fail everyone else's. ``user_disk_bytes`` bounds what
is under a user's directory plus what that user has in flight; by default, when other users may
connect, half the root's filesystem. A snapshot that would pass it is refused when it asks for
a host buffer, before any byte is copied, with an error naming the quota. Retention deletes
older snapshots only once a newer one is committed, so a quota must hold ``keep_last`` + 1 of a
job's snapshots, plus those in flight.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from snapd.errors import LimitExceeded

log = logging.getLogger(__name__)


def disk_usage(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (not following links; a file hard-linked into
    several snapshots, as incremental snapshots share them, counted once)."""
    total = 0
    linked: set[tuple[int, int]] = set()
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    st = e.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in linked:
                            continue
                        linked.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
            except OSError:
                pass
    return total


class Quotas:
    """What each user's directory holds, measured when first asked and after each snapshot ends."""

    def __init__(self, limit: int | None, shared: bool, root: Path) -> None:
        if limit is None and shared:
            st = os.statvfs(root)
            limit = st.f_blocks * st.f_frsize // 2
        self.limit = limit
        self._used: dict[Path, int] = {}

    def refresh(self, jobs_root: Path) -> None:
        if self.limit is not None:
            self._used[jobs_root] = disk_usage(jobs_root)

    def check(self, s: Any, nbytes: int, pending: int) -> None:
        """Raise LimitExceeded if ``s``'s user would pass the quota with a snapshot of ``nbytes``
        (``pending``: the bytes of that user's snapshots in flight)."""
        if self.limit is None:
            return
        if s.jobs_root not in self._used:
            self.refresh(s.jobs_root)
        used = self._used[s.jobs_root]
        if used + pending + nbytes > self.limit:
            log.warning("uid %d: a snapshot of %d bytes refused: %d on disk and %d in flight, quota %d",
                        s.uid, nbytes, used, pending, self.limit)
            # (in a per-user directory the files are the daemon's: the user removes them through it)
            raise LimitExceeded(f"this snapshot of {nbytes} bytes would pass your quota on this node's "
                                f"snapd, user_disk_bytes = {self.limit}: your snapshots take {used} bytes "
                                f"(under {s.jobs_root}) and {pending} more are being written. Retention "
                                "deletes older snapshots only after a newer one commits: lower keep_last, "
                                "remove the snapshots you no longer need (`snapd rm JOB STEP...`, or "
                                "Client.remove), or ask the operator for more")
