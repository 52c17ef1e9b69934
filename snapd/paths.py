"""Where snapd listens and writes by default. Light: the client imports it.

Never ``/run/snapd`` or ``/var/lib/snapd``: Canonical's snap daemon owns
those names on every Ubuntu node; ours are ``snapd-ckpt``.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapd.errors import InvalidArgument

MAX_SOCKET_PATH = 107  # bytes: sockaddr_un's sun_path (108 on Linux) less its NUL


def default_endpoint() -> str:
    """``$SNAPD_ENDPOINT``, else a per-user runtime socket, else root's under /run/snapd-ckpt."""
    env = os.environ.get("SNAPD_ENDPOINT")
    if env:
        return env
    if os.geteuid() == 0:
        return "ipc:///run/snapd-ckpt/snapd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/snapd-ckpt-{os.geteuid()}"
    return f"ipc://{runtime}/snapd-ckpt/snapd.sock"


def default_root() -> Path:
    env = os.environ.get("SNAPD_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/snapd-ckpt/snapshots")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "snapd-ckpt" / "snapshots"


def socket_path(endpoint: str) -> Path:
    """The socket file of an ``ipc://PATH`` endpoint; anything else is refused."""
    if not isinstance(endpoint, str) or not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@") \
            or len(endpoint) <= len("ipc://"):
        raise InvalidArgument(f"endpoint {endpoint!r}: snapd listens only on ipc://PATH endpoints "
                              "(abstract ipc://@ sockets bypass file permissions; tcp is not local)")
    return Path(endpoint[len("ipc://"):])


def check_endpoint(endpoint: object) -> str:
    """``endpoint`` if it is an ``ipc://PATH`` snapd can use, a relative PATH made absolute (a
    spawned daemon runs in ``/``); anything else raises InvalidArgument naming the problem."""
    path = socket_path(endpoint)  # type: ignore[arg-type]
    if "\0" in str(path):
        raise InvalidArgument(f"endpoint {endpoint!r}: the socket path contains NUL")
    full = path if path.is_absolute() else Path(os.path.abspath(path))
    size = len(os.fsencode(full))
    if size > MAX_SOCKET_PATH:  # (else ZeroMQ's bind or connect fails with "File name too long")
        raise InvalidArgument(f"endpoint {endpoint!r}: its socket path is {size} bytes, and a Unix "
                              f"socket's path has at most {MAX_SOCKET_PATH}: choose a shorter one "
                              "(under /tmp or $XDG_RUNTIME_DIR)")
    return endpoint if path.is_absolute() else f"ipc://{full}"  # type: ignore[return-value]


def access_problem(endpoint: str) -> str | None:
    """Why this process cannot reach the socket of ``endpoint`` although a daemon's socket is there
    (its directory or the socket is another group's), or None. Without it, such a user would only
    see no daemon answer: ZeroMQ's connect queues silently."""
    path = socket_path(endpoint)
    for p in (path.parent, path):
        try:
            st = os.stat(p)
        except OSError:
            return None  # no socket there: nothing to say beyond "no daemon answers"
        need = os.X_OK if p == path.parent else os.R_OK | os.W_OK
        if not os.access(p, need):
            try:
                import grp

                group = grp.getgrgid(st.st_gid).gr_name
            except (KeyError, ImportError):
                group = str(st.st_gid)
            return (f"a snapd daemon listens at {endpoint}, but this user (uid {os.geteuid()}) may not reach "
                    f"{p}: it is for group {group!r}. Ask the node's operator to add you to it (sudo usermod "
                    f"-aG {group} $USER), or run a daemon of your own on another endpoint")
    return None
