"""What dead processes leave under /dev/shm: a killed daemon's host buffers, and the regions of
trainers that died while no daemon watched them. Nothing else would ever remove them. The pid in
each name says whose it is, but only in its owner's pid namespace: a daemon in a container sees
another namespace's live owners as gone. So an owner also holds a shared flock on its file for as
long as it lives, and a file is taken for a leftover only when its pid is gone from here and no
one holds that lock (the lock alone would take an older version's files, which hold none, for
leftovers while their owners live). A file named with this process's own pid is never a live
owner's other than ours, and ours hold their locks: a daemon that is pid 1 in its container takes
up what the killed pid 1 before it left (its pid is always alive), and so does a reused pid."""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path

from snapd.format.jobdir import pid_alive

log = logging.getLogger(__name__)

REGION_RE = re.compile(r"^snapd-client-(\d+)-[0-9a-f]+\Z", re.ASCII)  # client/registered.py


def dead_pid_files(shm_dir: Path, name_re: re.Pattern) -> list[os.DirEntry]:
    """Files under ``shm_dir`` whose name matches ``name_re`` and names (group 1) a pid that is gone."""
    try:
        entries = list(os.scandir(shm_dir))
    except OSError:
        return []
    out = []
    for e in entries:
        m = name_re.match(e.name)
        if not m:
            continue
        pid = int(m.group(1))
        if (pid == os.getpid() or not pid_alive(pid)) and not _held(e.path):
            out.append(e)
    return out


def _held(path: str) -> bool:
    """Whether a live process holds the file's flock (its owner, in any pid namespace)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_dead_regions(shm_dir: Path) -> None:
    """Remove the registered regions of trainers that died while no daemon watched them (a
    daemon stopped before it noticed): nothing else would ever unlink them."""
    for e in dead_pid_files(shm_dir, REGION_RE):
        try:
            os.unlink(e.path)
            log.info("removed the region of a dead client: %s", e.path)
        except OSError:
            pass
