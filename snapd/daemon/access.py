"""Who may connect to the daemon, and where each user's snapshots land.

Three layers, outermost first:

1. The socket: its directory ``0750`` and the socket ``0660``, group = the
   config's ``socket_group``; without one, ``0700``/``0600`` (the daemon's
   uid only). Clients can reach the socket but never write its directory.
2. ZAP: libzmq asks ``inproc://zeromq.zap.01`` about every new ipc peer and
   passes ``localhost:<uid>:<gid>:<pid>`` read with SO_PEERCRED (the kernel's
   word, not the client's). A uid the policy does not allow is refused at the
   handshake: the connection never carries a request. The client sees the
   handshake fail and raises PermissionDenied (client/connection.py).
3. Per-user directories: with ``user_dirs`` on, a client's jobs live under
   ``<root>/<user>/``, mode 0700 plus an ACL giving that user (only) read
   access to what the daemon writes there, so no user reaches another's jobs
   through the daemon.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

import zmq

from snapd import posix_acl
from snapd.daemon.config import DaemonConfig
from snapd.errors import InvalidArgument

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"snapd"
DEFAULT_GROUP = "snapd-ckpt"


@dataclass(frozen=True)
class Peer:
    """A connected process, as SO_PEERCRED reported it when it connected."""

    uid: int
    gid: int
    pid: int

    @classmethod
    def from_address(cls, address: str) -> Peer:
        """Parse libzmq's ipc ``Peer-Address``: ``localhost:<uid>:<gid>:<pid>``."""
        parts = address.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"not an ipc peer address with credentials: {address!r}")
        return cls(int(parts[1]), int(parts[2]), int(parts[3]))

    @property
    def user(self) -> str:
        """The user's name when it is a safe directory name, else its uid."""
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)
        return name if name and "/" not in name and not name.startswith(".") else str(self.uid)

    def groups(self) -> set[int]:
        """Primary and supplementary gids of the process (from /proc while it lives)."""
        gids = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        gids.update(int(g) for g in line.split()[1:])
        except OSError:
            pass
        return gids


def _uid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    except KeyError:
        raise InvalidArgument(f"allowed_users: no user {name!r} on this node") from None


def _gid(name: str, setting: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgument(f"{setting}: no group {name!r} on this node") from None


def _may_chgrp(gid: int) -> bool:
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


class AccessPolicy:
    """The resolved access settings of one daemon (names looked up once, at start)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.daemon_uid = os.geteuid()
        self.socket_gid: int | None = None
        if config.socket_group:
            try:
                gid = _gid(config.socket_group, "socket_group")
                if not _may_chgrp(gid):
                    raise InvalidArgument(f"socket_group: this daemon (uid {self.daemon_uid}) is not a "
                                          f"member of group {config.socket_group!r}, so cannot give it the "
                                          "socket")
                self.socket_gid = gid
            except InvalidArgument as e:
                if config.socket_group != DEFAULT_GROUP:
                    raise
                log.debug("%s; the socket is for uid %d only", e, self.daemon_uid)
        self.uids = {self.daemon_uid, 0} | {_uid(u) for u in config.allowed_users}
        groups = config.allowed_groups
        if groups is None:
            self.gids = {self.socket_gid} if self.socket_gid is not None else set()
        else:
            self.gids = {_gid(g, "allowed_groups") for g in groups}
        others = bool(self.uids - {self.daemon_uid, 0} or self.gids)
        self.user_dirs = config.user_dirs == "on" or (config.user_dirs == "auto" and others)

    def allows(self, peer: Peer) -> bool:
        return peer.uid in self.uids or bool(self.gids & peer.groups())

    def describe(self) -> dict:
        """For ``snapd status``."""
        return {"uids": sorted(self.uids), "gids": sorted(self.gids), "socket_gid": self.socket_gid,
                "user_dirs": self.user_dirs}

    # -- the socket ------------------------------------------------------------------
    def prepare_socket_dir(self, directory: Path) -> None:
        """0750 with the socket group (0700 without): clients may enter, never write."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = directory.stat()
        if st.st_uid != self.daemon_uid:  # e.g. /run: not ours to change
            return
        if self.socket_gid is not None:
            os.chown(directory, -1, self.socket_gid)
        os.chmod(directory, 0o750 if self.socket_gid is not None else 0o700)

    def secure_socket(self, path: Path) -> None:
        if self.socket_gid is not None:
            os.chown(path, -1, self.socket_gid)
        os.chmod(path, 0o660 if self.socket_gid is not None else 0o600)

    # -- where a client's jobs live ------------------------------------------------------
    def jobs_root(self, root: Path, peer: Peer) -> Path:
        """``root`` itself, or ``root/<user>`` (created; readable by that user alone)."""
        if not self.user_dirs:
            return root
        path = root / peer.user
        mode = os.stat(root).st_mode
        if mode & 0o055 != 0o011:  # users traverse root to reach their directory; they may not list it
            try:                   # (its listing names every user of the node)
                os.chmod(root, (mode & ~0o044) | 0o011)
            except OSError as e:
                log.warning("%s: cannot make it traversable but not listable (%s): users can restore only as "
                            "root, or see who else uses the node", root, e.strerror)
        if not path.is_dir():
            path.mkdir(mode=0o700, exist_ok=True)
            log.info("created %s for uid %d", path, peer.uid)
        if peer.uid != self.daemon_uid and peer.uid not in posix_acl.named_users(path):
            try:
                posix_acl.grant(path, {peer.uid: posix_acl.R | posix_acl.X}, inherit=True)
            except OSError as e:
                log.warning("%s: cannot give uid %d read access (%s); it can restore only as root",
                            path, peer.uid, e.strerror)
        return path


class ZapHandler:
    """Answers libzmq's ZAP requests (RFC 27) for the server's ROUTER socket."""

    def __init__(self, ctx: zmq.Context, policy: AccessPolicy) -> None:
        self.policy = policy
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.refused = 0

    @staticmethod
    def protect(sock: zmq.Socket) -> None:
        """Make libzmq consult the handler for ``sock``'s peers (NULL mechanism needs a domain)."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def handle(self) -> None:
        frames = self.sock.recv_multipart()
        envelope, body = frames[:2], frames[2:]
        request_id = body[1] if len(body) > 1 else b""
        try:
            peer = Peer.from_address(body[3].decode())
        except (IndexError, UnicodeDecodeError, ValueError) as e:
            log.warning("ZAP request without peer credentials refused: %s", e)
            self._reply(envelope, request_id, b"400", b"no peer credentials", b"")
            return
        if self.policy.allows(peer):
            self._reply(envelope, request_id, b"200", b"OK", str(peer.uid).encode())
            return
        self.refused += 1
        log.warning("refused uid %d (%s) gid %d pid %d: not allowed by this daemon's config (allowed_users, "
                    "allowed_groups)", peer.uid, peer.user, peer.gid, peer.pid)
        self._reply(envelope, request_id, b"400", f"uid {peer.uid} is not allowed".encode(), b"")

    def _reply(self, envelope: list[bytes], request_id: bytes, status: bytes, text: bytes,
               user: bytes) -> None:
        self.sock.send_multipart(envelope + [b"1.0", request_id, status, text, user, b""])

    def close(self) -> None:
        self.sock.close(linger=0)
