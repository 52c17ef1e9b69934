"""A job's directory: ``<root>/<job>/``, its lock, and moving snapshot
directories in and out of it atomically.

Layout (docs/FORMAT.md):
  step-000000001200/          a committed snapshot (manifest.json + data files)
  index.json                  latest, history, best (snapd.format.index)
  .lock                       flock(2) taken around every commit and retention pass
  .tmp-<step>-<pid>-<hex>/    a snapshot being written (never listed)
  .trash-<name>-<hex>/        a snapshot being deleted (never listed)
Leftovers of dead writers are removed the next time a writer opens the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
import zlib
from pathlib import Path

from snapd.errors import FormatError, InvalidArgument, LockTimeout
from snapd.format import job_lock
from snapd.format.job_lock import LOCK_NAME

log = logging.getLogger(__name__)

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z", re.ASCII)
SNAPSHOT_RE = re.compile(r"^step-(\d{12,})\Z", re.ASCII)
# .tmp-<step>-<pid>-<hex>, or .tmp-<step>-<pid>-<host>-<hex> (since rank parts: a root shared by
# several nodes holds other hosts' writers, whose pids mean nothing here)
TMP_RE = re.compile(r"^\.tmp-(\d+)-(\d+)-(?:([0-9a-f]{8})-)?[0-9a-f]+\Z", re.ASCII)
# a global snapshot's parts so far: its step, world size and run (snapd.format.global_commit)
PENDING_RE = re.compile(r"^\.pending-(\d{12,})-w(\d{5,})-([0-9a-f]{8})\Z", re.ASCII)
FAILED_NAME = "failed"  # in a pending directory: why its step was given up (snapd.format.global_commit)
FOREIGN_TMP_STALE_S = 24 * 3600  # another host's temporary directory untouched this long is removed
STALE_SWEEP_EVERY_S = 3600.0  # how often a process looks for those (a stat each)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_job_name(job: object) -> str:
    """Return ``job`` if it is a valid job name, else raise naming the problem."""
    if not isinstance(job, str) or not JOB_NAME_RE.match(job) or job in (".", ".."):
        raise InvalidArgument(
            f"invalid job name {job!r}: use 1-128 letters, digits, '.', '_' or '-', not starting with "
            "'.' or '-' (no '/', '..', absolute paths or NUL)")
    return job


def check_step(step: object) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidArgument(f"step must be an integer >= 0, got {step!r}")
    return step


def snapshot_name(step: int) -> str:
    return f"step-{step:012d}"


def pending_name(step: int, world_size: int, run: str) -> str:
    return f".pending-{step:012d}-w{world_size:05d}-{zlib.crc32(run.encode()):08x}"


def step_of(name: str) -> int | None:
    m = SNAPSHOT_RE.match(name)
    return int(m.group(1)) if m else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: Path | str, dir_fd: int | None = None) -> bytes:
    """A file's bytes, refusing anything but a regular file (a FIFO planted as a manifest or an
    index must not hang a reader, or the daemon's commit under the job lock); ``dir_fd``: ``path``
    is a name in that directory, and a symbolic link there is refused."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if dir_fd is not None else 0)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path}: not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def host_id() -> str:
    """This host's mark in temporary directory names (8 hex digits of its name)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _age_s(path: str | os.PathLike) -> float:
    try:
        return time.time() - os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _stale_sweep_due(path: Path) -> bool:
    """Whether this process last looked for day-old leftovers in the job at ``path`` over
    ``STALE_SWEEP_EVERY_S`` ago (and notes that it looks now)."""
    now, key = time.monotonic(), str(path)
    last = _stale_swept.get(key)
    if last is not None and now - last < STALE_SWEEP_EVERY_S:
        return False
    if len(_stale_swept) >= 4096:
        _stale_swept.clear()
    _stale_swept[key] = now
    return True


# when this process last looked for day-old leftovers, per job (filled as jobs are written)
_stale_swept: dict[str, float] = {}


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, its parent not yet told) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's: alive)
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class JobDir:
    """The directory of one job under a snapshot root."""

    def __init__(self, root: str | os.PathLike, job: str) -> None:
        self.root = Path(root)
        self.job = check_job_name(job)
        self.path = self.root / job

    # -- writer side ---------------------------------------------------------
    def open_for_write(self) -> None:
        """Create the job directory if needed and clear dead writers' leftovers."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / LOCK_NAME).exists():  # (marks a job: a daemon's start clears its leftovers
                os.close(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644))  # before a commit)
        except OSError as e:
            raise InvalidArgument(f"cannot create job directory {self.path}: {e.strerror}") from None
        self.remove_leftovers()

    def new_tmp_dir(self, step: int) -> Path:
        tmp = self.path / f".tmp-{step}-{os.getpid()}-{host_id()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    def remove_leftovers(self, stale: bool | None = None) -> None:
        """Remove what dead writers on this host left, on every write: a look at each temporary
        directory's name (and one liveness check per pid). What is only removed once untouched
        for a day (other hosts' temporary directories, the parts of a global snapshot) costs a
        stat each, a network round trip on a shared root: ``stale`` looks at those too, by default
        once an hour per job in this process. No lock is needed (none is taken on every write: the
        ranks of a large job would queue behind each other's scans) but to remove such parts, as a
        late part could be arriving into them."""
        if stale is None:
            stale = _stale_sweep_due(self.path)
        alive: dict[int, bool] = {}
        old = []
        for entry in os.scandir(self.path):
            m = TMP_RE.match(entry.name)
            if m and (m.group(3) or host_id()) != host_id():
                if stale and _age_s(entry.path) > FOREIGN_TMP_STALE_S:
                    log.info("removing another host's leftover, untouched for a day: %s", entry.path)
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif m and int(m.group(2)) != os.getpid():
                pid = int(m.group(2))
                if pid not in alive:
                    alive[pid] = pid_alive(pid)
                if not alive[pid]:
                    log.info("removing leftover of a dead writer: %s", entry.path)
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name.startswith(".trash-"):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif stale and PENDING_RE.match(entry.name) and _age_s(entry.path) > FOREIGN_TMP_STALE_S:
                old.append(entry.path)
        if old:
            self._remove_stale_parts(old)

    def _remove_stale_parts(self, old: list[str]) -> None:
        try:
            with self.lock(timeout_s=10.0):
                for path in old:
                    # (one given up stays until the next commit: a late part must still learn why)
                    if _age_s(path) > FOREIGN_TMP_STALE_S:
                        log.info("removing the parts of a global snapshot, untouched for a day: %s", path)
                        shutil.rmtree(path, ignore_errors=True)
        except LockTimeout as e:  # (a cleanup: it never fails the write that asked for it)
            log.warning("%s: stale parts not removed this time: %s", self.path, e)

    def lock(self, timeout_s: float = 120.0) -> contextlib.AbstractContextManager[None]:
        """The job's lock, shared by every writer of every node (snapd.format.job_lock)."""
        return job_lock.hold(self.path, timeout_s)

    def install(self, tmp: Path, step: int) -> list[Path]:
        """Move a finished temporary snapshot into place (call under ``lock``).

        A snapshot of the same step already there is swapped out atomically
        (renameat2 RENAME_EXCHANGE), so readers always see one complete version
        or the other. Returns what was swapped out, renamed out of sight: the
        caller removes it (``remove``) once it has let go of the lock.
        """
        final = self.path / snapshot_name(step)
        out = []
        if final.exists():
            if _exchange(tmp, final):
                out.append(self.trash(tmp.name))
            else:  # no renameat2: a crash between these two renames loses only this step
                out.append(self.path / f".trash-{final.name}-{secrets.token_hex(4)}")
                os.rename(final, out[-1])
                os.rename(tmp, final)
        else:
            os.rename(tmp, final)
        fsync_dir(self.path)
        return [p for p in out if p is not None]

    def trash(self, name: str) -> Path | None:
        """Rename a snapshot directory out of sight (quick: under ``lock``); ``remove`` it later."""
        trash = self.path / f".trash-{name}-{secrets.token_hex(4)}"
        try:
            os.rename(self.path / name, trash)
        except FileNotFoundError:
            return None
        return trash

    @staticmethod
    def remove(trash: list[Path]) -> None:
        """Remove what ``trash`` renamed out of sight (seconds for a large snapshot: not under the lock;
        a crash meanwhile leaves it to ``remove_leftovers``)."""
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)

    def delete(self, name: str) -> None:
        """Delete a snapshot directory: rename it out of sight first, then remove it."""
        self.remove([p for p in [self.trash(name)] if p is not None])

    # -- reader side ---------------------------------------------------------
    def snapshot_dirs(self) -> dict[int, Path]:
        """Committed snapshot directories by step (validity is checked by readers)."""
        out: dict[int, Path] = {}
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return out
        for entry in entries:
            step = step_of(entry.name)
            if step is not None and entry.is_dir(follow_symlinks=False):
                out[step] = Path(entry.path)
        return out


def _exchange(a: Path, b: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(b))
