"""The CurveZMQ keys of a cluster's daemons: one pair made once (``snapd peer-keys DIR``) and copied
to every node, readable only by the daemon's user.

A key directory holds the daemon's own pair as ``NAME.key_secret`` (the czmq certificate format,
which libzmq's tools and pyzmq's ``zmq.auth`` read) and any number of public ``*.key`` files: the
keys of the peers it accepts. The pair's public half is also the server key a daemon expects its
peers to present, so all daemons of a cluster share one pair; a job that must be kept apart gets
daemons with a directory of its own.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from snapd.errors import InvalidArgument

log = logging.getLogger(__name__)

SECRET_SUFFIX = ".key_secret"
PUBLIC_SUFFIX = ".key"
_BANNER = "#   snapd peer key ({kind}): CurveZMQ, czmq certificate format\n#   made by `snapd peer-keys`\n"


@dataclass(frozen=True)
class PeerKeys:
    public: bytes  # Z85, 40 characters
    secret: bytes
    allowed: frozenset[bytes]  # the public keys a peer may present
    where: Path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PeerKeys:
        """This daemon's pair and the keys it accepts; refuses a directory or a secret key that
        another user could read or replace."""
        d = Path(directory)
        if not d.is_dir():
            raise InvalidArgument(f"peer_keys {d}: no such directory (make one with `snapd peer-keys {d}`)")
        _private(d, "peer key directory", 0o022)
        secrets = sorted(d.glob("*" + SECRET_SUFFIX))
        if len(secrets) != 1:
            raise InvalidArgument(f"peer_keys {d}: expected one *{SECRET_SUFFIX} file (this daemon's key), "
                                  f"found {len(secrets)}")
        _private(secrets[0], "secret peer key", 0o077)
        public, secret = _read(secrets[0])
        if secret is None:
            raise InvalidArgument(f"{secrets[0]}: no secret-key in it")
        allowed = {public}
        for p in sorted(d.glob("*" + PUBLIC_SUFFIX)):
            _private(p, "peer key", 0o022)
            allowed.add(_read(p)[0])
        return cls(public, secret, frozenset(allowed), d)


def create(directory: str | os.PathLike, name: str = "cluster") -> tuple[Path, Path]:
    """A new pair in ``directory`` (made mode 0700 if absent): ``NAME.key_secret`` (mode 0600) and
    ``NAME.key``. Never overwrites a key."""
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(f"key name {name!r}: a plain file name, please")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    paths = (d / f"{name}{SECRET_SUFFIX}", d / f"{name}{PUBLIC_SUFFIX}")
    for path, text, mode in ((paths[0], _cert(public, secret), 0o600),
                             (paths[1], _cert(public, None), 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError:
            raise InvalidArgument(f"{path} exists: not replacing a key (remove it first)") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return paths


def _cert(public: bytes, secret: bytes | None) -> str:
    text = _BANNER.format(kind="secret" if secret else "public") + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def _read(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path}: not a CurveZMQ certificate ({e})") from None
    if not public or len(public) != 40:
        raise InvalidArgument(f"{path}: no 40-character public-key in it")
    return public, secret


def _private(path: Path, what: str, forbidden: int) -> None:
    st = os.stat(path, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{what} {path} is a symbolic link")
    if st.st_uid != os.geteuid():
        raise InvalidArgument(f"{what} {path} belongs to uid {st.st_uid}, not this daemon's {os.geteuid()}")
    if st.st_mode & forbidden:
        raise InvalidArgument(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):o}: other users could "
                              f"{'read' if forbidden == 0o077 else 'change'} it (chmod "
                              f"{'600' if forbidden == 0o077 else 'go-w'} {path})")
