"""The one exception hierarchy of snapd, shared by the format, the protocol,
the daemon and the client.

Every error carries a stable wire ``code``. Exceptions become codes only at
the server's edge and the client maps codes back to the same classes, so a
caller catches the same class whether the failure happened in-process or in
the daemon. Each subclass also subclasses the builtin a caller would catch
(``FormatError`` is a ``ValueError``, ``FlushError`` an ``OSError``...).
"""

from __future__ import annotations


class SnapdError(Exception):
    """Base of every snapd error. ``code`` is the wire code."""

    code = "error"


class FormatError(SnapdError, ValueError):
    """A file on disk does not follow the format (docs/FORMAT.md)."""

    code = "format"


class ChecksumError(FormatError):
    """Stored bytes do not match their recorded checksum."""

    code = "checksum"


class VersionError(FormatError):
    """The snapshot was written by a newer format version than this reader."""

    code = "version"


class SnapshotNotFound(SnapdError, FileNotFoundError):
    """No snapshot matches the requested job and step."""

    code = "not_found"


class KeySelectionError(SnapdError, KeyError):
    """A requested key path is not in the snapshot."""

    code = "no_such_key"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MismatchError(SnapdError, ValueError):
    """Restoring into an existing tree found shape/dtype/structure mismatches."""

    code = "mismatch"


class UnsupportedValueError(SnapdError, TypeError):
    """A leaf of the state tree cannot be saved (named by key path and type)."""

    code = "unsupported_value"


class InvalidArgument(SnapdError, ValueError):
    """A caller passed an invalid argument (job name, step, option...)."""

    code = "invalid_argument"


class FlushError(SnapdError, OSError):
    """Writing a snapshot to disk failed; nothing already on disk was lost."""

    code = "flush"


class LockTimeout(SnapdError, TimeoutError):
    """Another writer holds the job's lock for longer than we may wait."""

    code = "lock_timeout"


class ProtocolError(SnapdError, ValueError):
    """A message broke the protocol (docs/PROTOCOL.md); ``code`` says how."""

    code = "protocol"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class DaemonUnavailable(SnapdError, ConnectionError):
    """No daemon answered at the endpoint within the timeout."""

    code = "unavailable"


class Busy(SnapdError):
    """Every host buffer is in use (on_busy="skip")."""

    code = "busy"


class ShuttingDown(SnapdError):
    """The daemon is draining and accepts no new snapshots."""

    code = "shutting_down"


class PermissionDenied(SnapdError, PermissionError):
    """The daemon refuses this uid, or a per-client limit forbids the request."""

    code = "permission_denied"


class LimitExceeded(SnapdError):
    """A request exceeds a limit: a per-client one of the daemon's config, or the memory left for a
    larger host buffer (the message names which)."""

    code = "limit"


class CommitFailed(SnapdError):
    """A global snapshot (a step of a job on several ranks) was not committed: a rank's part did not
    come in time, failed, or disagreed with the others (the message names the ranks)."""

    code = "commit_failed"


class RemoteError(SnapdError, OSError):
    """The object store of the remote tier refused or did not answer (the message names the object
    and what the store said)."""

    code = "remote"


class SnapshotError(SnapdError):
    """A snapshot failed in the daemon; ``code`` and ``stage`` say where."""

    code = "snapshot_failed"

    def __init__(self, message: str, code: str = "snapshot_failed", stage: str = "",
                 details: dict | None = None) -> None:
        super().__init__(f"{message} (stage: {stage})" if stage else message)
        self.code = code
        self.stage = stage
        self.details = details or {}  # what the code carries besides (ipc_refused: refused, any_open)


_BY_CODE: dict[str, type[SnapdError]] = {}


def register(cls: type[SnapdError]) -> type[SnapdError]:
    """Make ``cls`` reachable from its wire code (used by later modules)."""
    _BY_CODE[cls.code] = cls
    return cls


for _cls in (SnapdError, FormatError, ChecksumError, VersionError, SnapshotNotFound,
             KeySelectionError, MismatchError, UnsupportedValueError, InvalidArgument,
             FlushError, LockTimeout, ProtocolError, DaemonUnavailable, Busy, ShuttingDown, PermissionDenied,
             LimitExceeded, CommitFailed, SnapshotError):
    register(_cls)


def error_from_code(code: str, message: str) -> SnapdError:
    """Rebuild the exception a wire ``code`` stands for (unknown -> SnapdError)."""
    cls = _BY_CODE.get(code, SnapdError)
    err = cls(message)
    if err.code != code:
        err.code = code
    return err
