"""Where snapd listens and writes by default. Light: the client imports it.

Never ``/run/snapd`` or ``/var/lib/snapd``: Canonical's snap daemon owns
those names on every Ubuntu node; ours are ``snapd-ckpt``.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapd.errors import InvalidArgument


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
    return endpoint if path.is_absolute() else f"ipc://{os.path.abspath(path)}"  # type: ignore[return-value]
