"""What the server knows of each client: its session, its queued buffer
requests, and the shared-memory regions it registered (the registered path).
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snapd.errors import ProtocolError
from snapd.format.writer import Retention

REGION_RE = re.compile(r"^snapd-client-(\d+)-[0-9a-f]+$")


@dataclass
class Region:
    """A client's registered shared-memory region, mapped read-only."""

    path: str
    mm: mmap.mmap
    view: np.ndarray


@dataclass
class Session:
    peer: bytes
    job: str
    pid: int
    retention: Retention
    on_busy: str
    leases: set[int] = field(default_factory=set)
    regions: dict[int, Region] = field(default_factory=dict)


@dataclass
class Waiter:
    peer: bytes
    req_id: int
    emergency: bool
    since: float


def open_region(path: str, nbytes: int, pid: int, shm_dir: Path) -> Region:
    """Map a client's region read-only, after checking it is that client's:
    named for its pid, directly under ``shm_dir``, owned by its uid, of the
    announced size."""
    m = REGION_RE.match(os.path.basename(path))
    if os.path.dirname(path) != str(shm_dir) or not m or int(m.group(1)) != pid:
        raise ProtocolError(f"{path}: not a region of client pid {pid} under {shm_dir}", "bad_region")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ProtocolError(f"{path}: cannot open: {e.strerror}", "bad_region") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.stat(f"/proc/{pid}").st_uid or st.st_size != nbytes:
            raise ProtocolError(f"{path}: not owned by the client or not {nbytes} bytes", "bad_region")
        mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    return Region(path, mm, np.frombuffer(mm, dtype=np.uint8))
