"""POSIX ACLs, written directly as the ``system.posix_acl_*`` xattrs.

Used where one named uid, and nobody else, must reach a file owned by
another uid: a host buffer the daemon leases to one user, a client's
registered region the daemon reads, a user's snapshot directory. The xattr
format is the kernel's (include/uapi/linux/posix_acl_xattr.h): a version
word, then (tag, perm, id) entries sorted by tag, then id. No dependency on
libacl or setfacl. Light: the client imports it.
"""

from __future__ import annotations

import os
import stat
import struct

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
R, W, X = 4, 2, 1


def _encode(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", VERSION) + b"".join(struct.pack("<HHI", *e) for e in sorted(entries))


def _acl(mode: int, users: dict[int, int]) -> bytes:
    """The ACL for ``mode``'s owner/group/other bits plus ``users`` (uid -> perms), masked by their union."""
    owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    mask = group
    for perms in users.values():
        mask |= perms
    entries = [(USER_OBJ, owner, UNDEFINED_ID), (GROUP_OBJ, group, UNDEFINED_ID),
               (OTHER, other, UNDEFINED_ID)]
    entries += [(USER, perms, uid) for uid, perms in users.items()]
    if users:
        entries.append((MASK, mask, UNDEFINED_ID))
    return _encode(entries)


def grant(target: str | os.PathLike | int, users: dict[int, int], *, inherit: bool = False) -> None:
    """Give each uid in ``users`` the permission bits mapped to it (R|W|X) on ``target``.

    ``target`` is a path or an open fd; the mode's own bits are kept. With
    ``inherit`` (directories), the same entries become the default ACL, so
    files and directories created inside give those uids the same access
    (capped by the mode they are created with). Raises OSError (EOPNOTSUPP
    where the filesystem has no ACLs).
    """
    st = os.stat(target)
    value = _acl(stat.S_IMODE(st.st_mode), users)
    os.setxattr(target, "system.posix_acl_access", value)
    if inherit:
        os.setxattr(target, "system.posix_acl_default", value)


def named_users(target: str | os.PathLike | int) -> dict[int, int]:
    """The named-user entries of ``target``'s access ACL (uid -> perms); {} when it has none."""
    try:
        raw = os.getxattr(target, "system.posix_acl_access")
    except OSError:
        return {}
    out = {}
    for off in range(4, len(raw), 8):
        tag, perms, uid = struct.unpack_from("<HHI", raw, off)
        if tag == USER:
            out[uid] = perms
    return out
