"""Writing one snapshot: data shards, manifest, atomic commit (then retention: snapd.format.retention).

``SnapshotWriter`` is the flush stage: it takes already-encoded chunks in
order, appends them to sequential data files in a temporary directory,
then ``commit`` fsyncs each file once, writes the manifest last, renames
the directory into place and updates the index under the job lock.
Older snapshots are deleted only after the new one is committed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapd import __version__
from snapd.errors import FlushError, SnapdError
from snapd.format import index as jobindex
from snapd.format.codecs import Encoded
from snapd.format.data_file import DataFile, renumber
from snapd.format.incremental import Shared
from snapd.format.shared_files import SharedFiles
from snapd.format.jobdir import JobDir, fsync_dir
from snapd.format.chunks import CODECS, Chunk
from snapd.format.manifest import MANIFEST_NAME, Manifest, TensorRecord
from snapd.format.retention import Retention, tidy

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_SHARD_BYTES = 1 << 30


@dataclass
class Committed:
    """What a commit produced: the snapshot's directory and its index entry."""

    path: Path
    entry: jobindex.Entry
    # what retention renamed out of sight, still to remove when the commit deferred it (the daemon
    # says "persisted" first: removing a large snapshot takes seconds that are no one's wait)
    trash: list[Path] = field(default_factory=list)


class SnapshotWriter:
    """Writes one snapshot of ``job`` at ``step`` into a temporary directory."""

    def __init__(self, job: JobDir, step: int, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.job = job
        self.step = step
        self.shard_bytes = shard_bytes
        self.tmp = job.new_tmp_dir(step)
        self.files: list[DataFile] = []
        self.links = SharedFiles(self.tmp, job.path)  # earlier snapshots' files it shares
        self.compared_with: str | None = None  # the snapshot whose chunks it looked for (incremental)
        self.tensors: list[TensorRecord] = []
        self.taken_unix_s = time.time()  # the daemon sets when the state was handed to it

    def add_tensor(self, key: str, kind: str, dtype: str, shape: tuple[int, ...],
                   nbytes: int) -> TensorRecord:
        rec = TensorRecord(key, kind, dtype, list(shape), nbytes)
        self.tensors.append(rec)
        return rec

    @property
    def io_seconds(self) -> float:
        """Time this snapshot's writes and fsyncs blocked so far."""
        return sum(f.io_seconds for f in self.files)

    @property
    def disk_bytes_per_s(self) -> float | None:
        """Observed durable write speed of this snapshot (bytes over time blocked in I/O)."""
        secs = self.io_seconds
        size = sum(f.size for f in self.files)
        return size / secs if secs > 0 and size >= 64 << 20 else None

    @property
    def shared_bytes(self) -> int:
        """Stored bytes of the chunks left where an earlier snapshot wrote them."""
        return self.links.shared_bytes

    @property
    def written_bytes(self) -> int:
        """Bytes this snapshot wrote (its shared files not counted)."""
        return sum(f.size for f in self.files)

    def _next_number(self) -> int:
        return len(self.files) + len(self.links.linked)

    def write_chunk(self, rec: TensorRecord, enc: Encoded | Shared) -> None:
        """Append an encoded chunk of ``rec`` (chunks of a tensor come in order), or refer to the
        stored chunk of an earlier snapshot it is the same as."""
        if isinstance(enc, Shared):
            if self.links.refer(rec, enc, self._next_number()):
                return
            enc = enc.encode()  # (that file could not be linked: the chunk is written after all)
        number, offset = self._append(enc)
        rec.chunks.append(Chunk(number, offset, enc.stored, enc.raw, enc.codec, enc.checksum, enc.planes,
                                enc.digest))

    def _append(self, enc: Encoded) -> tuple[int, int]:
        path = self.files[-1].path if self.files else self.tmp
        try:
            if not self.files or self.files[-1].size >= self.shard_bytes:
                if self.files:
                    self.files[-1].finish()  # (writes what it held back: may fail as any write)
                n = self._next_number()
                path = self.tmp / f"data-{n:05d}.bin"
                self.files.append(DataFile(path, n))
            f = self.files[-1]
            return f.number, f.append(enc)
        except OSError as e:
            raise FlushError(f"writing {path}: {e.strerror or e}") from e

    def _copy_sparse(self) -> None:
        """Copy the chunks of the linked files this snapshot uses too little of into its own files."""
        for f, chunks in self.links.sparse(self.tensors):
            fd = os.open(f.path, os.O_RDONLY)
            try:
                for c in chunks:
                    data = os.pread(fd, c.stored, c.offset)
                    if len(data) != c.stored:
                        raise FlushError(f"{f.source.path}: shorter than its manifest says")
                    c.file, c.offset = self._append(Encoded([data], c.stored, c.raw, c.codec, c.checksum,
                                                            c.planes, c.digest))
            finally:
                os.close(fd)
            self.links.drop(f, chunks)

    def _number_files(self) -> list[dict]:
        """Finish the data files and name them in order (``data-i-of-n``); the manifest's ``files``."""
        order = sorted([*self.files, *self.links.linked], key=lambda f: f.number)
        index = {f.number: i for i, f in enumerate(order)}
        for t in self.tensors:
            for c in t.chunks:
                c.file = index[c.file]
        files = []
        for i, f in enumerate(order):
            if isinstance(f, DataFile):
                if f.fd >= 0:
                    f.finish()
                if f.number != i:  # (a linked file before it was dropped: its header says its place)
                    renumber(f.path, i)
            name = f"data-{i:05d}-of-{len(order):05d}.bin"
            os.rename(f.path, self.tmp / name)
            files.append({"name": name, "bytes": f.size})
            if not isinstance(f, DataFile):  # where it was linked from (for people; readers need not)
                files[-1].update(self.links.describe(f))
        return files

    def seal(self, *, tree: dict, metrics: dict | None, codec: str, best: tuple[str, str] | None,
             emergency: bool = False, part: dict | None = None) -> Manifest:
        """Finish the data files and write the manifest last, all fsynced (still in the temporary
        directory: ``commit`` installs it; a rank's part is delivered by snapd.format.global_commit)."""
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}")
        self._copy_sparse()
        files = self._number_files()
        manifest = Manifest(step=self.step, created_unix_s=time.time(), job=self.job.job, tree=tree,
                            tensors=self.tensors, files=files, metrics=dict(metrics or {}), codec=codec,
                            emergency=emergency, writer=f"snapd {__version__}", best_metric=best,
                            taken_unix_s=self.taken_unix_s, part=part, compared_with=self.compared_with)
        with open(self.tmp / MANIFEST_NAME, "wb") as mf:
            mf.write(manifest.to_bytes())
            mf.flush()
            os.fsync(mf.fileno())
        fsync_dir(self.tmp)
        return manifest

    def commit(self, *, tree: dict, metrics: dict | None, codec: str, retention: Retention,
               emergency: bool = False, defer_removal: bool = False) -> Committed:
        """Make the snapshot durable and visible, then apply retention (``defer_removal``: what it
        takes is left in ``Committed.trash`` for the caller to remove, with ``JobDir.remove``)."""
        try:
            manifest = self.seal(tree=tree, metrics=metrics, codec=codec, best=retention.best,
                                 emergency=emergency)
            with self.job.lock():
                index = jobindex.load(self.job)
                trash = self.job.install(self.tmp, self.step)
                # committed from here on: what follows only tidies, and may fail without undoing it
                entry = jobindex.Entry.of(manifest)
                trash += tidy(self.job, index, entry, retention)
            if not defer_removal:  # (after the lock: the other writers of the job need not wait for it)
                self.job.remove(trash)
                trash = []
        except SnapdError:
            self.abort()
            raise
        except (OSError, ValueError) as e:
            self.abort()
            raise FlushError(f"committing step {self.step} of job {self.job.job}: {e}") from e
        return Committed(self.job.path / entry.name, entry, trash)

    def abort(self) -> None:
        """Drop the temporary directory; nothing committed before is touched."""
        for f in self.files:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        shutil.rmtree(self.tmp, ignore_errors=True)
