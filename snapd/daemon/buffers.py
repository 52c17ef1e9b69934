"""Host buffers: shared-memory regions the daemon owns and clients write into.

One file per buffer under /dev/shm (not one per tensor: a segment per
tensor has exhausted file descriptors in other tools), created 0600, sized
once and touched once at start (first touch of shared memory runs at
~1.3 GB/s here, an already touched buffer at ~8.5 GB/s). A buffer is leased
to one snapshot at a time: from ``acquire`` until its bytes are persisted (an emergency snapshot
waiting for one is lent it once the bytes are written: snapd.daemon.waiting).

A snapshot larger than a buffer grows the one it is granted, up to ``max_host_buffer_bytes``: a
fresh, larger file replaces it, made and touched on a thread while the snapshot waits (about 0.6 s
a GiB, once: the snapshots after run at full speed), as DCP's ``async_save`` allocates its staging
memory at its first save. A request that finds every buffer busy gets one more, made the same
way (``reserve``), within ``max_host_memory_bytes``.

A buffer serves one uid at a time. A client keeps its mapping after its
lease ends, so handing the same pages to another user would let the first
read the second's tensors: a buffer granted to a different uid is first
replaced by a fresh file (fresh pages) that only the new uid may open (a
POSIX ACL), made the same way.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np

from snapd import posix_acl
from snapd.daemon.leftovers import dead_pid_files
from snapd.daemon.host_memory import grown_size, room_to_grow, shm_room
from snapd.daemon.prefault import Prefault, populate
from snapd.errors import LimitExceeded

log = logging.getLogger(__name__)

PREPARING = 0  # the lease of a buffer whose replacement is being made (lease ids start at 1)
FILL_THREADS = 4  # threads that fault a buffer's pages in for a request waiting on it

def serves_uid(buffer_uid: int, uid: int) -> bool:
    """Whether a buffer made for ``buffer_uid`` (-1: the daemon's own) may be handed to ``uid``."""
    return buffer_uid == uid or (buffer_uid == -1 and uid == os.geteuid())


def owner_uid(buffer_uid: int) -> int:
    """The uid a buffer made for ``buffer_uid`` serves (-1: the daemon's own)."""
    return buffer_uid if buffer_uid != -1 else os.geteuid()


NAME_RE = re.compile(r"^snapd-(\d+)-[0-9a-f]+-\d+\Z", re.ASCII)


@dataclass
class HostBuffer:
    index: int
    path: Path
    size: int
    mm: mmap.mmap | None  # None: a slot for a buffer being made (``reserve``)
    view: np.ndarray  # uint8 over the whole mapping
    lease: int | None = None  # the lease holding it, None when free
    uid: int = -1  # the only client uid that may map it (-1: the daemon's own)
    fd: int = -1  # held open with a shared flock while the buffer lives (snapd.daemon.leftovers)


class BufferPool:
    """The daemon's host buffers. Leases are managed by the server thread only."""

    def __init__(self, shm_dir: Path, count: int, size: int) -> None:
        remove_stale(shm_dir)
        if shm_room(shm_dir) < count * size:  # else the first touch past the end is a SIGBUS
            raise OSError(f"{count} host buffers of {size} bytes need {count * size} bytes, but {shm_dir} "
                          f"has {shm_room(shm_dir)} free: lower host_buffer_bytes")
        self.shm_dir = shm_dir
        self.buffers: list[HostBuffer] = []
        # the GPU copier unpins a buffer, then calls the second argument, which unmaps it
        self.before_discard: Callable[[HostBuffer, Callable[[], None]], None] | None = None
        self.after_install: Callable[[HostBuffer], None] | None = None  # the GPU copier pins it
        # buffer index -> its pages being faulted in, in the background
        self._prefaults: dict[int, Prefault] = {}
        self._next_index = count
        try:
            for i in range(count):
                self.buffers.append(self._create(i, size, None))
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._touch, name="snapd-prefault", daemon=True).start()

    def _create(self, index: int, size: int, uid: int | None) -> HostBuffer:
        path = self.shm_dir / f"snapd-{os.getpid()}-{secrets.token_hex(4)}-{index}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if uid is not None and uid not in (os.geteuid(), 0):
                posix_acl.grant(fd, {uid: posix_acl.R | posix_acl.W})
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.flock(fd, fcntl.LOCK_SH)  # (alive, whatever pid namespace another daemon looks from)
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        return HostBuffer(index, path, size, mm, np.frombuffer(mm, dtype=np.uint8),
                          uid=-1 if uid is None else uid, fd=fd)

    @staticmethod
    def make_whole(buf: HostBuffer) -> None:
        """Give back a buffer's full size if its client truncated it (the mapping is safe again)."""
        try:
            if buf.mm is not None and os.stat(buf.path).st_size < buf.size:
                log.warning("host buffer %d was truncated by a client; restoring its size", buf.index)
                os.truncate(buf.path, buf.size)
        except OSError as e:
            log.warning("host buffer %d: cannot check its size: %s", buf.index, e)

    @staticmethod
    def serves(buf: HostBuffer, uid: int, nbytes: int) -> bool:
        """Whether ``buf`` holds a snapshot of ``nbytes`` for ``uid`` as it is."""
        return nbytes <= buf.size and serves_uid(buf.uid, uid)

    def replacement_size(self, buf: HostBuffer, uid: int, nbytes: int, cap: int) -> int | None:
        """The size of the fresh buffer that must replace ``buf`` before it can hold a snapshot of
        ``nbytes`` for ``uid`` (grown, at most to ``cap``, when ``nbytes`` is over its size), or
        None when ``buf`` serves as it is. Raises LimitExceeded when memory or the shm filesystem
        has no room for the larger buffer."""
        if self.serves(buf, uid, nbytes):
            return None
        size = buf.size if nbytes <= buf.size else grown_size(nbytes, cap)
        if size > buf.size:
            why = room_to_grow(self.shm_dir, size - buf.size)
            if why:
                raise LimitExceeded(f"a snapshot of {nbytes} bytes needs host buffer {buf.index} grown from "
                                    f"{buf.size} to {size} bytes, but {why}")
        return size

    def replace(self, buf: HostBuffer, size: int, uid: int, done: Callable[[HostBuffer, str], None],
                background: bool = False) -> None:
        """Make ``buf``'s replacement on a thread of its own, ``buf`` meanwhile held (``PREPARING``):
        a fresh file of ``size`` bytes that only ``uid`` may open, its pages faulted in there (about
        0.6 s a GiB), so that they are the daemon's memory, counted in its cgroup, and not a
        trainer's that touched them first. ``done(new, '')`` or ``done(buf, why)`` is called on
        that thread; the server thread then ``install``s it. ``background``: made ahead of need,
        on one thread at the lowest CPU priority until someone waits for it (``hurry``)."""
        buf.lease = PREPARING

        def work() -> None:
            try:
                if background:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # (this thread only)
                new = self.make(buf.index, size, uid, background)
            except Exception as e:
                log.error("cannot make host buffer %d of %d bytes for uid %d: %s", buf.index, size, uid, e)
                done(buf, f"cannot make a host buffer of {size} bytes: {e}")
                return
            done(new, "")
        threading.Thread(target=work, name=f"snapd-buffer-{buf.index}", daemon=True).start()

    def make(self, index: int, size: int, uid: int, background: bool = False) -> HostBuffer:
        """A fresh buffer for ``uid``, its pages faulted in (any thread): on ``FILL_THREADS``
        threads (a page's allocation and zeroing is the kernel's work, and it scales with cores),
        or ``background``: on this thread alone until ``hurry``."""
        new = self._create(index, size, uid)
        job = Prefault(new.view)
        try:
            if background:
                self._prefaults[index] = job
            else:
                job.start(min(FILL_THREADS, os.cpu_count() or 1) - 1, f"snapd-populate-{index}")
            job.work()
            job.wait()
        except BaseException:
            _discard(new)
            raise
        finally:
            self._prefaults.pop(index, None)
        return new

    def hurry(self, index: int) -> None:
        """A request waits for buffer ``index``, being made in the background: threads at the
        calling (server) thread's priority join in for the pages still untouched."""
        job = self._prefaults.get(index)
        if job is not None and job.untouched():
            job.start(min(FILL_THREADS, os.cpu_count() or 1), f"snapd-hurry-{index}")

    def reserve(self, size: int) -> HostBuffer:
        """A slot for one more buffer of ``size``, to be made by ``replace`` (it counts in ``total``
        from now on: two requests cannot both take the last of the memory)."""
        slot = HostBuffer(self._next_index, self.shm_dir / "(being made)", size, None, np.empty(0, np.uint8),
                          PREPARING)
        self._next_index += 1
        self.buffers.append(slot)
        return slot

    def total(self) -> int:
        return sum(b.size for b in self.buffers)

    def drop(self, b: HostBuffer, why: str = "no client left") -> None:
        """``b`` (free, or a slot whose buffer could not be made) leaves the pool."""
        self.buffers = [x for x in self.buffers if x is not b]
        self._discard(b)
        if b.mm is not None:
            log.info("host buffer %d (%d MiB) released: %s", b.index, b.size >> 20, why)

    def install(self, new: HostBuffer, ahead: bool = False) -> HostBuffer:
        """``new`` (from ``make``) takes the place of the buffer (or slot) of its index, which goes
        (server thread). ``ahead``: made ahead of need (buffer_making logs why)."""
        at = next((i for i, b in enumerate(self.buffers) if b.index == new.index), None)
        if at is None:  # closed meanwhile
            _discard(new)
            return new
        old = self.buffers[at]
        self.buffers[at] = new
        self._discard(old)
        if old.mm is None and not ahead:
            log.warning("host buffer %d of %d MiB added: more snapshots at once than buffers", new.index,
                        new.size >> 20)
        elif new.size > old.size:
            log.warning("host buffer %d grown from %d to %d MiB for a larger snapshot (start with "
                        "host_buffer_bytes >= %d to skip this)", new.index, old.size >> 20, new.size >> 20,
                        new.size)
        if new.uid != old.uid and old.mm is not None:
            log.info("host buffer %d now serves uid %d (fresh pages: the previous user keeps its mapping)",
                     new.index, new.uid)
        if self.after_install is not None:
            self.after_install(new)
        return new

    def _touch(self) -> None:
        """Fault every page in once, off the serving thread, WITHOUT writing: a client may already be
        copying a snapshot into a buffer (this once wrote a zero to every page, over the first byte
        of pages a client had just filled; tests/integration/test_daemon.py catches it)."""
        buffers = list(self.buffers)  # (the pool may be closed meanwhile)
        for b in buffers:
            populate(b.view)
        log.info("host buffers ready: %d x %d MiB in %s", len(buffers), buffers[0].size >> 20, self.shm_dir)

    def free(self, nbytes: int = 0, uid: int | None = None) -> HostBuffer | None:
        """A free buffer: one that holds ``nbytes`` and already serves ``uid`` if any (nothing to
        make), else one that holds ``nbytes``, else the largest (the least to grow)."""
        free = [b for b in self.buffers if b.lease is None]
        fits = [b for b in free if b.size >= nbytes]
        return next((b for b in fits if uid is not None and serves_uid(b.uid, uid)), None) \
            or next(iter(fits), None) or max(free, key=lambda b: b.size, default=None)

    def by_lease(self, lease: int) -> HostBuffer | None:
        return next((b for b in self.buffers if b.lease == lease), None)

    def describe(self, uid: int | None = None) -> list[dict]:
        """The buffers (those that may serve ``uid``, when given: no user learns another's paths)."""
        return [{"index": b.index, "path": str(b.path), "bytes": b.size} for b in self.buffers
                if b.mm is not None and (uid is None or serves_uid(b.uid, uid))]

    def close(self) -> None:
        for b in self.buffers:
            self._discard(b)
        self.buffers = []

    def _discard(self, b: HostBuffer) -> None:
        if self.before_discard is not None and b.view.size:
            self.before_discard(b, lambda: _discard(b))
        else:
            _discard(b)


def _discard(b: HostBuffer) -> None:
    if b.mm is None:  # a slot: nothing was made
        return
    b.path.unlink(missing_ok=True)
    if b.fd >= 0:
        os.close(b.fd)
        b.fd = -1
    b.view = np.empty(0, np.uint8)
    try:
        b.mm.close()
    except BufferError:  # a view is still exported; the pages go when it does
        pass


def remove_stale(shm_dir: Path) -> None:
    """Remove buffers left by daemons of ours that died (SIGKILL leaves them behind)."""
    for e in dead_pid_files(shm_dir, NAME_RE):
        try:
            if e.stat().st_uid == os.geteuid():
                os.unlink(e.path)
                log.info("removed a dead daemon's host buffer %s", e.path)
        except OSError:
            pass
