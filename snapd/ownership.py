"""Who must own the paths snapd trusts, checked the way sshd's StrictModes checks a home.

A user who creates a path before the daemon first starts (under a world-writable /tmp or
/var/tmp, say) must not win it: a lock file made a symlink would have the daemon overwrite the
link's target; a socket directory or snapshot root made by another user lets that user read or
swap what is in it; a socket swapped in by another user would receive a trainer's tensors. So the
daemon refuses a socket directory, lock file or snapshot root that it (or root) does not own, or
that others may write, and the client refuses a socket that neither it, root nor the daemon's
system user owns. Light: the client imports it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from snapd.errors import InvalidArgument, PermissionDenied

SERVICE_USER = "snapd-ckpt"  # the system service's user (systemd/snapd-ckpt.sysusers.conf)


def check_owned_dir(path: Path, what: str, group_above: bool = False) -> None:
    """``path`` (symlinks resolved) and each directory above it must belong to this process's uid
    or root, and no one else may write them, except a root-owned sticky directory (/tmp, /dev/shm)
    above it, where no user can rename another's entries. ``group_above``: a group may write the
    directories above (a team's shared project directory holding a snapshot root)."""
    real = path.resolve()
    for p in (real, *real.parents):
        try:
            st = os.stat(p)
        except OSError as e:
            raise InvalidArgument(f"{what} {path}: {p}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what} {path}: {p} is not a directory")
        if st.st_uid not in (os.geteuid(), 0):
            raise InvalidArgument(f"{what} {path}: {p} belongs to uid {st.st_uid}, not to this daemon (uid "
                                  f"{os.geteuid()}) or root: another user may have made it first; remove "
                                  "it, or choose a path only root or this daemon's user can write")
        sticky_root = st.st_uid == 0 and st.st_mode & stat.S_ISVTX and p != real
        writers = 0o002 if group_above and p != real else 0o022
        if st.st_mode & writers and not sticky_root:
            raise InvalidArgument(f"{what} {path}: other users can write {p} (mode "
                                  f"{stat.S_IMODE(st.st_mode):o}): chmod go-w it, or choose another path")


def open_lock(path: Path) -> int:
    """The daemon's lock file, opened without following a symlink; it must be a regular file of
    this uid with one link (a hard link to another file is refused too)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
        raise InvalidArgument(f"lock file {path}: {e.strerror} (a symlink planted there is refused)") \
            from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise InvalidArgument(f"lock file {path} is not a regular file of this daemon's uid with one link: "
                              "another user may have made it first; remove it")
    return fd


def trusted_uids() -> set[int]:
    """The uids a trainer may hand its tensors to: its own, root's, the service user's."""
    uids = {os.geteuid(), 0}
    try:
        import pwd

        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    except (KeyError, ImportError):
        pass
    return uids


def check_socket_owner(sock: Path, endpoint: str) -> None:
    """Refuse a socket that another user owns: it is not a daemon of ours, or of the node's."""
    try:
        st = os.stat(sock)
    except OSError:
        return  # nothing there (or not reachable): the connection says so in its own words
    if st.st_uid not in trusted_uids():
        raise PermissionDenied(f"the socket of {endpoint} belongs to uid {st.st_uid}, not to this user, root "
                               f"or {SERVICE_USER}: another user may have put it there; snapd will not hand "
                               "it tensors")
