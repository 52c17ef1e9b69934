"""What the server knows of each client: its session, and which clients are gone."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from snapd.daemon.layouts import Layout
from snapd.daemon.regions import Region
from snapd.format.writer import Retention

log = logging.getLogger(__name__)


@dataclass
class Session:
    peer: bytes
    job: str
    pid: int  # from SO_PEERCRED, like uid: the kernel's word, not the client's
    uid: int
    jobs_root: Path  # where this client's jobs live: the root, or the root's per-user directory
    retention: Retention
    on_busy: str
    notices: bool = False  # it asked to be told when a request waits (``waiting``)
    leases: set[int] = field(default_factory=set)  # buffers granted, snapshot not yet sent
    regions: dict[int, Region] = field(default_factory=dict)
    layout: Layout | None = None  # the last layout accepted on this connection
    last_snapshot: dict | None = None  # its step, tensor count and bytes by path (``snapd status``)
    expects: int | None = None  # the buffer its job's last snapshot needs, when it resumed (Leases.expect)


def gone(sessions: dict[bytes, Session]) -> list[Session]:
    """The sessions whose client process is gone; their regions' files are unlinked (copies in
    flight keep their descriptors)."""
    out = []
    for s in sessions.values():
        try:
            os.kill(s.pid, 0)
        except ProcessLookupError:
            log.info("client pid %d (job %s) is gone; releasing its buffers", s.pid, s.job)
            out.append(s)
            for region in s.regions.values():
                try:
                    os.unlink(region.path)
                except OSError:
                    pass
        except PermissionError:
            pass
    return out
