"""What training code imports: ``save``, ``load`` and ``list_snapshots``.

Light on purpose: importing it loads NumPy and the format, never torch or
CuPy; torch is used only when the state holds torch tensors.
"""

from snapd.client.local import list_snapshots, load, save
from snapd.errors import (ChecksumError, FormatError, InvalidArgument, KeySelectionError, MismatchError,
                          SnapdError, SnapshotNotFound, UnsupportedValueError, VersionError)
from snapd.format.catalog import SnapshotInfo

__all__ = ["ChecksumError", "FormatError", "InvalidArgument", "KeySelectionError", "MismatchError",
           "SnapdError", "SnapshotInfo", "SnapshotNotFound", "UnsupportedValueError", "VersionError",
           "list_snapshots", "load", "save"]
