"""A client's registered shared-memory regions (the registered path): opened after checking they
are that client's, and read with ``pread`` (never through a mapping the client could cut short).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snapd.daemon.leftovers import REGION_RE
from snapd.errors import ProtocolError


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
            raise ProtocolError(f"{src.region.path}: the region is now shorter than the "
                                f"{src.offset + src.nbytes} "
                                "bytes registered (truncated by the client)", "bad_region")
        done += n


def open_region(path: str, nbytes: int, pid: int, uid: int, shm_dir: Path,
                own_pid: int | None = None) -> Region:
    """Open a client's region read-only, after checking it is that client's: a regular file
    named for its pid, directly under ``shm_dir``, owned by its uid, of the announced size.
    ``own_pid``: the pid the client knows itself by, where it runs in another pid namespace (a
    container) and the kernel tells the daemon another one (``pid``): the name may carry either;
    the owner's uid is the kernel's word either way."""
    m = REGION_RE.match(os.path.basename(path))
    if os.path.dirname(path) != str(shm_dir) or not m or int(m.group(1)) not in (pid, own_pid):
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
