"""How much host memory the daemon's buffers may take.

Three things bound it: the machine's memory, the memory limit of the cgroup the daemon runs in
(systemd's ``MemoryMax=``, a batch job's allocation: psutil sees neither), and the room left in
the shared-memory filesystem, where a page touched past its end is a SIGBUS in whoever touched
it, the trainer included. The defaults of ``host_buffer_bytes`` and ``max_host_memory_bytes`` are
made here, and a buffer is grown or added only when all three have room for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MIB = 1 << 20
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> list[tuple[Path, str, str]]:
    """(directory, limit file, usage file) of this process's memory cgroup and each ancestor
    whose directory is visible here (a container shows only part of the tree)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    for line in lines:  # "0::/path" (v2) or "4:memory:/path" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in parts[1].split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        rel = Path(parts[2].lstrip("/"))
        dirs = [base / rel, *(base / p for p in rel.parents)]
        found = [(d, *files) for d in dirs if (d / files[0]).exists()]
        if found:
            return found
    return []


def cgroup_limits(proc_cgroup: Path = Path("/proc/self/cgroup"),
                  root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """The lowest memory limit over this process's cgroup and its ancestors, and the least
    headroom (limit minus usage) among them; None for each where no limit is set."""
    limit = headroom = None
    for d, limit_file, usage_file in _cgroup_dirs(proc_cgroup, root):
        lim = _read_int(d / limit_file)
        if lim is None:
            continue
        limit = lim if limit is None else min(limit, lim)
        room = max(0, lim - (_read_int(d / usage_file) or 0))
        headroom = room if headroom is None else min(headroom, room)
    return limit, headroom


def memory_limit() -> int:
    """The most memory the daemon may use: the machine's, or its cgroup's limit if lower."""
    limit, _ = cgroup_limits()
    total = psutil.virtual_memory().total
    return total if limit is None else min(total, limit)


def available_memory() -> int:
    """Memory free for new buffers now: the machine's available memory, or the cgroup's headroom."""
    _, headroom = cgroup_limits()
    avail = psutil.virtual_memory().available
    return avail if headroom is None else min(avail, headroom)


def shm_room(shm_dir: Path) -> int:
    """Bytes still free in the shared-memory filesystem."""
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def shm_size(shm_dir: Path) -> int:
    st = os.statvfs(shm_dir)
    return st.f_blocks * st.f_frsize


def default_host_buffer_bytes() -> int:
    """64 MiB: buffers start small and grow to the snapshots they are given (up to
    ``max_host_buffer_bytes``, a share of the memory limit), so a daemon that serves small states
    stays small; one sized from the machine's memory (an eighth of it) held gigabytes resident for
    a 4 KiB state. A job that resumes has its buffers grown before its first snapshot."""
    return 64 * MIB


def default_host_memory_bytes(shm_dir: Path) -> int:
    """The most all host buffers together take by default: half the daemon's memory limit and half
    the shm filesystem (the rest is for the trainers and their registered regions)."""
    try:
        shm = shm_size(shm_dir)
    except OSError:  # the pool reports a missing shm_dir with its own error
        shm = memory_limit()
    return min(memory_limit(), shm) // 2 // MIB * MIB


def grown_size(nbytes: int, cap: int) -> int:
    """The size a buffer grows to for a snapshot of ``nbytes``: a sixteenth more (a state that
    grows a little, say by a metric, does not grow the buffers again), in 64 MiB steps, at most
    ``cap``."""
    step = 64 * MIB
    return max(nbytes, min(cap, -(-(nbytes + nbytes // 16) // step) * step))


def room_to_grow(shm_dir: Path, extra: int) -> str:
    """Why ``extra`` more bytes of buffer cannot be had now ('' when they can)."""
    room = shm_room(shm_dir)
    if room < extra:
        return f"{shm_dir} has {room} bytes free"
    avail = available_memory()
    if avail < extra:
        return f"only {avail} bytes of memory are available (machine or cgroup)"
    return ""
