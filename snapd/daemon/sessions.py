"""What the server knows of each client: its session, the shared-memory regions it
registered (the registered path), and how a session ends (``bye``, or the client's death).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from snapd.daemon.leftovers import REGION_RE
from snapd.errors import ProtocolError
from snapd.format.writer import Retention

if TYPE_CHECKING:
    from snapd.daemon.layouts import Layout

log = logging.getLogger(__name__)



class Region:
    """A client's registered shared-memory region, read through its descriptor.

    The client owns the file and may truncate it at any time: a read through a mapping of
    it would then kill the daemon with SIGBUS. ``pread`` into the host buffer is the same
    one copy, and a file cut short only makes it return less (that snapshot fails)."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size

    def span(self, offset: int, nbytes: int) -> RegionSpan:
        return RegionSpan(self, offset, nbytes)

    def __del__(self) -> None:  # copies in flight hold the region: the last one closes it
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass(frozen=True)
class RegionSpan:
    region: Region
    offset: int
    nbytes: int


def copy_from_region(dst: np.ndarray, src: RegionSpan) -> None:
    """Copy a region's bytes into ``dst`` (a host-buffer view of their size), or raise
    ``ProtocolError`` naming the region when the client has cut it short."""
    view = memoryview(dst).cast("B")
    done = 0
    while done < src.nbytes:
        n = os.preadv(src.region.fd, [view[done:]], src.offset + done)
        if n <= 0:
            raise ProtocolError(f"{src.region.path}: the region is now shorter than the {src.offset + src.nbytes} "
                                "bytes registered (truncated by the client)", "bad_region")
        done += n


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


def open_region(path: str, nbytes: int, pid: int, uid: int, shm_dir: Path) -> Region:
    """Open a client's region read-only, after checking it is that client's: a regular file
    named for its pid, directly under ``shm_dir``, owned by its uid, of the announced size."""
    m = REGION_RE.match(os.path.basename(path))
    if os.path.dirname(path) != str(shm_dir) or not m or int(m.group(1)) != pid:
        raise ProtocolError(f"{path}: not a region of client pid {pid} under {shm_dir}", "bad_region")
    try:  # O_NONBLOCK: a FIFO named like a region must not block the server thread
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        hint = " (the client must grant the daemon's uid read access)" if e.errno == 13 else ""
        raise ProtocolError(f"{path}: cannot open: {e.strerror}{hint}", "bad_region") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"{path}: not a regular file", "bad_region")
        if st.st_uid != uid or st.st_size != nbytes:
            raise ProtocolError(f"{path}: not owned by the client or not {nbytes} bytes", "bad_region")
    except BaseException:
        os.close(fd)
        raise
    return Region(path, fd, nbytes)


def end_session(server: Any, s: Session, bye: int | None = None) -> None:
    """The client left (``bye``: the id of its request, answered once the GPU copier has closed its
    handles) or died: its leases go back, its waits end, the GPU copier closes what it opened."""
    del server.sessions[s.peer]
    server.syncs = [x for x in server.syncs if x[0] != s.peer]
    server.leases.release_all(s)
    if server.gpu is not None:
        server.gpu.forget(s.peer, bye)
    server.metrics.clients.set(len(server.sessions))


def reap_dead_clients(server: Any) -> None:
    for s in list(server.sessions.values()):
        try:
            os.kill(s.pid, 0)
        except ProcessLookupError:
            log.info("client pid %d (job %s) is gone; releasing its buffers", s.pid, s.job)
            end_session(server, s)
            for region in s.regions.values():  # copies in flight keep their mapping
                try:
                    os.unlink(region.path)
                except OSError:
                    pass
        except PermissionError:
            pass
