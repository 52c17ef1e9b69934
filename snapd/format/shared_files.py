"""The data files a snapshot being written shares with an earlier snapshot of its job: hard links
made as the first chunk found unchanged in each comes (snapd.format.incremental), and, when the
snapshot is sealed, the ones it refers to too little of, whose chunks it then copies into its own
data files (a snapshot must not keep an old file alive for a few of its bytes)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from snapd.format.chunks import Chunk
from snapd.format.incremental import MIN_LIVE, Shared, Source
from snapd.format.manifest import TensorRecord

log = logging.getLogger(__name__)


@dataclass
class SharedFile:
    """An earlier snapshot's data file, hard-linked into this one as data file ``number``."""

    path: Path
    number: int
    source: Source
    size: int


class SharedFiles:
    def __init__(self, tmp: Path, job_path: Path) -> None:
        self.tmp = tmp
        self.job_path = job_path
        self.by_source: dict[Path, SharedFile | None] = {}  # None: it could not be linked
        self.shared_bytes = 0  # stored bytes of the chunks left where an earlier snapshot wrote them

    @property
    def linked(self) -> list[SharedFile]:
        return [f for f in self.by_source.values() if f is not None]

    def refer(self, rec: TensorRecord, shared: Shared, number: int) -> bool:
        """Add ``shared``'s chunk to ``rec`` where it lies (its file linked as data file ``number``
        if it is the first from that file); False if the file cannot be linked."""
        src = shared.source
        if src.path not in self.by_source:
            self.by_source[src.path] = self._link(src, number)
        f = self.by_source[src.path]
        if f is None:
            return False
        c = shared.chunk
        rec.chunks.append(Chunk(f.number, c.offset, c.stored, c.raw, c.codec, c.checksum, c.planes,
                                shared.digest))
        self.shared_bytes += c.stored
        return True

    def _link(self, src: Source, number: int) -> SharedFile | None:
        """Hard-link ``src`` here, if it is still the file its descriptor holds."""
        path = self.tmp / f"shared-{number:05d}.bin"
        try:
            os.link(src.name, path, src_dir_fd=src.dir_fd, follow_symlinks=False)
            st, held = os.stat(path, follow_symlinks=False), os.fstat(src.fd)
        except OSError as e:  # (deleted since, another file system, too many links: written instead)
            log.info("%s: cannot share %s (%s); its chunks are written again", self.tmp, src.path,
                     e.strerror or e)
            return None
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):  # replaced since it was read: not it
            os.unlink(path)
            return None
        return SharedFile(path, number, src, src.bytes)

    def sparse(self, tensors: list[TensorRecord]) -> list[tuple[SharedFile, list[Chunk]]]:
        """The linked files this snapshot refers to for less than ``MIN_LIVE`` of their bytes, with
        the chunks that lie in them."""
        out = []
        for f in self.linked:
            chunks = [c for t in tensors for c in t.chunks if c.file == f.number]
            if sum(c.stored for c in chunks) < MIN_LIVE * f.size:
                out.append((f, chunks))
        return out

    def drop(self, f: SharedFile, chunks: list[Chunk]) -> None:
        """``f``'s chunks were copied into this snapshot's own files: unlink it."""
        self.shared_bytes -= sum(c.stored for c in chunks)
        self.by_source[f.source.path] = None
        os.unlink(f.path)

    def describe(self, f: SharedFile) -> dict:
        """What the manifest says of a shared file besides its name and size (FORMAT.md section 9)."""
        return {"shard": f.source.shard, "shared_from": os.path.relpath(f.source.path, self.job_path)}
