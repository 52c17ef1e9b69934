"""What training code imports.

- In-process, no daemon: ``save``, ``load``, ``list_snapshots``.
- Through the daemon: ``connect(job) -> Client``; ``Client.snapshot(state, step=...) -> Pending``;
  the module-level ``snapshot()`` uses a default client.

Light on purpose: importing it loads NumPy and the format, never torch or
CuPy (torch only when the state holds torch tensors); ZeroMQ is loaded the
first time the daemon path is used.
"""

from typing import Any

from snapd.client.local import list_snapshots, load, save
from snapd.errors import (Busy, ChecksumError, DaemonUnavailable, FormatError, InvalidArgument,
                          KeySelectionError,
                          MismatchError, SnapdError, SnapshotError, SnapshotNotFound, UnsupportedValueError,
                          VersionError)
from snapd.format.catalog import SnapshotInfo

_DAEMON_API = ("connect", "Client", "Pending", "Persisted", "snapshot")

__all__ = ["Busy", "ChecksumError", "DaemonUnavailable", "FormatError", "InvalidArgument",
           "KeySelectionError",
           "MismatchError", "SnapdError", "SnapshotError", "SnapshotInfo", "SnapshotNotFound",
           "UnsupportedValueError", "VersionError", "list_snapshots", "load", "save", *_DAEMON_API]


def __getattr__(name: str) -> Any:
    if name in _DAEMON_API:  # loads ZeroMQ only when the daemon path is used
        from snapd.client import daemon, hello

        return getattr(hello if name in ("connect", "snapshot") else daemon, name)
    raise AttributeError(f"module 'snapd.client' has no attribute {name!r}")
