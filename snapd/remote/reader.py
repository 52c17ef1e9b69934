"""Reading a snapshot from the remote tier: the same readers as for a local directory
(snapd.format.reader, snapd.format.global_reader), each chunk fetched with its own ranged GET (on
the reader's threads, so in parallel) and checked against its checksum as it arrives. A partial
restore (``keys=``, one rank's view of a global snapshot) fetches only the chunks it needs.
"""

from __future__ import annotations

import logging
import threading

from snapd.errors import FormatError, SnapshotNotFound
from snapd.format.chunks import Chunk
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.global_reader import GlobalReader
from snapd.format.manifest import MANIFEST_NAME, parse
from snapd.format.reader import SnapshotReader
from snapd.remote.store import Store

log = logging.getLogger(__name__)


class RemotePath(str):
    """``s3://bucket/key``, spelled like a ``Path`` where the readers join names onto it."""

    def __truediv__(self, other: str) -> RemotePath:
        return RemotePath(f"{self}/{other}")

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]


class RemoteSnapshotReader(SnapshotReader):
    def __init__(self, store: Store, key: str, raw: bytes | None = None) -> None:
        self.store, self.key = store, key
        self.path = RemotePath(store.where(key))  # type: ignore[assignment]
        if raw is None:
            raw = store.get(f"{key}/{MANIFEST_NAME}")
            if raw is None:
                raise SnapshotNotFound(f"{self.path}: no such snapshot (no {MANIFEST_NAME} object)")
        self.manifest = parse(raw, f"{self.path}/{MANIFEST_NAME}")
        self._fds = {}
        self._fds_lock = threading.Lock()

    def _stored(self, c: Chunk, out: memoryview) -> tuple[memoryview | bytes, int]:
        name = self.manifest.files[c.file]["name"]
        got = self.store.get_range(f"{self.key}/{name}", c.offset, c.stored)
        if c.codec == "raw" and len(got) == c.stored:
            out[:] = got
            return out, len(got)
        return got, len(got)

    def close(self) -> None:
        pass


class RemoteGlobalReader(GlobalReader):
    def __init__(self, store: Store, key: str, manifest: GlobalManifest, rank: int | None) -> None:
        self.store, self.key = store, key
        super().__init__(RemotePath(store.where(key)), manifest, rank)  # type: ignore[arg-type]

    def _open_part(self, rank: int) -> SnapshotReader:
        return RemoteSnapshotReader(self.store, f"{self.key}/{part_dir(rank)}")


def open_remote(store: Store, job: str, name: str, rank: int | None = None) -> SnapshotReader | GlobalReader:
    """A reader over the remote snapshot ``name`` (``step-<N>``) of ``job``."""
    key = store.key(job, name)
    raw = store.get(f"{key}/{MANIFEST_NAME}")
    if raw is None:
        raise SnapshotNotFound(f"{store.where(key)}: no such snapshot (no {MANIFEST_NAME} object)")
    where = f"{store.where(key)}/{MANIFEST_NAME}"
    m = parse_any(raw, where)
    if isinstance(m, GlobalManifest):
        return RemoteGlobalReader(store, key, m, rank)
    if m.part is not None:
        raise FormatError(f"{where}: a rank's part, not a snapshot")
    return RemoteSnapshotReader(store, key, raw)
