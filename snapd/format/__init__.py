"""The on-disk snapshot format (docs/FORMAT.md): shared by the daemon, which
writes it, and the client, which reads it. Imports NumPy and the codec
libraries, never torch, CuPy, ZeroMQ or daemon code.
"""

from snapd.format.catalog import SnapshotInfo, list_snapshots, resolve
from snapd.format.jobdir import JobDir, check_job_name
from snapd.format.manifest import FORMAT_VERSION, MAGIC, Manifest, parse
from snapd.format.reader import SnapshotReader
from snapd.format.saving import DEFAULT_CODEC, save_state
from snapd.format.writer import Committed, Retention, SnapshotWriter

__all__ = ["FORMAT_VERSION", "MAGIC", "Committed", "DEFAULT_CODEC", "JobDir", "Manifest", "Retention",
           "SnapshotInfo", "SnapshotReader", "SnapshotWriter", "check_job_name", "list_snapshots",
           "parse", "resolve", "save_state"]
