"""Reading a snapshot: whole, partially (by key path) or into existing tensors.

Chunks are read with pread on a thread pool (snapd.format.windowed_reads), checksummed and decoded
straight into the destination tensor's memory: a raw chunk lands in place
with no intermediate copy. A tensor stored raw in one run of one data file
is not read at all when it comes back as a new CPU tensor: it is the mapped
file (copy-on-write, as safetensors returns it), its chunks checksummed in
place (``mapping``). Nothing is trusted before it is checked: the manifest
(snapd.format.manifest), each data file's header and size, each chunk's
checksum and decoded length.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


from snapd.errors import FormatError, SnapshotNotFound
from snapd.format import codecs, dtypes, windowed_reads
from snapd.format.jobdir import read_regular
from snapd.format.mapping import map_private
from snapd.format.pools import started_pool
from snapd.format.manifest import MANIFEST_NAME, Chunk, Manifest, TensorRecord, parse
from snapd.format.restore import load_tree, select
from snapd.format.data_file import ALIGN, DATA_HEADER, DATA_MAGIC

log = logging.getLogger(__name__)


MIN_MAPPED_BYTES = 4096  # smaller tensors are copied: a page of their own costs nothing to read


class SnapshotReader:
    """An open snapshot directory. Use as a context manager, or call ``close``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST_NAME
        try:
            raw = read_regular(mpath)
        except FileNotFoundError:
            if self.path.is_dir():
                raise FormatError(f"{self.path}: no {MANIFEST_NAME}: not a committed snapshot") from None
            raise SnapshotNotFound(f"{self.path}: no such snapshot directory") from None
        except IsADirectoryError:
            raise FormatError(f"{mpath}: is a directory") from None
        self.manifest: Manifest = parse(raw, str(mpath))
        self._fds: dict[int, int] = {}
        self._fds_lock = threading.Lock()  # reader threads open data files on demand
        self._maps: dict[int, memoryview | None] = {}
        self._mapped_at: set[tuple[int, int]] = set()  # (file, offset) of the tensors mapped this load
        self.checked = True  # chunks' checksums verified as they are read (``load(verify=False)``: not)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._maps.clear()  # (a mapping lives on, unmapped once the last tensor over it is freed)

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is not None:
            return fd
        with self._fds_lock:  # two threads must not both open a file and keep one descriptor
            fd = self._fds.get(i)
            return fd if fd is not None else self._open_data(i)

    def _open_data(self, i: int) -> int:
        info = self.manifest.files[i]
        path = self.path / info["name"]
        try:  # O_NONBLOCK: a FIFO planted as a data file must not hang the reader
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FormatError(f"{path}: data file is missing") from None
        except OSError as e:
            raise FormatError(f"{path}: cannot open the data file: {e.strerror}") from None
        st = os.fstat(fd)
        size = st.st_size
        header = os.pread(fd, DATA_HEADER.size, 0) if stat.S_ISREG(st.st_mode) else b""
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif size != info["bytes"]:
            problem = f"is {size} bytes, the manifest says {info['bytes']} (truncated or replaced)"
        elif len(header) < DATA_HEADER.size or DATA_HEADER.unpack(header)[0] != DATA_MAGIC:
            problem = "does not start with the snapd data magic"
        elif DATA_HEADER.unpack(header)[2] != info.get("shard", i):  # (a shared file keeps its number)
            problem = f"is shard {DATA_HEADER.unpack(header)[2]}, expected shard {info.get('shard', i)}"
        if problem:
            os.close(fd)
            raise FormatError(f"{path}: {problem}")
        self._fds[i] = fd
        return fd

    def new_mappings(self) -> None:
        """Start a load: its tensors get mappings of their own (private to this load: two loads'
        tensors never share memory, as a write to one would show in the other)."""
        self._maps.clear()
        self._mapped_at.clear()

    def mapping(self, i: int) -> memoryview | None:
        """Tensor ``i``'s bytes in its mapped data file (private: writing to them copies the page,
        never touches the file), when it is stored raw in one run of one file and no tensor of
        this load is mapped there already (an incremental snapshot stores equal tensors once: each
        must still be its own memory); None otherwise. Nothing is checked here: ``verify_mapped``
        checksums the chunks in place."""
        rec = self.manifest.tensors[i]
        chunks = rec.chunks
        if rec.nbytes < MIN_MAPPED_BYTES or not chunks or chunks[0].offset % ALIGN:
            return None
        end = chunks[0].offset
        for c in chunks:
            if c.codec != "raw" or c.file != chunks[0].file or c.offset != end or \
                    (c.file, c.offset) in self._mapped_at:
                return None
            end += c.stored
        mapped = self._map(chunks[0].file)
        # (no madvise: WILLNEED or POPULATE_READ made both warm and cold restores slower here; the
        # checking threads' faults read ahead on their own: docs/benchmarks.md)
        if mapped is None:
            return None
        self._mapped_at.update((c.file, c.offset) for c in chunks)
        return mapped[chunks[0].offset:end]

    def _map(self, i: int) -> memoryview | None:
        if i in self._maps:
            return self._maps[i]
        fd = self._fd(i)  # (checks the file first)
        with self._fds_lock:
            if i not in self._maps:
                try:
                    self._maps[i] = map_private(fd, self.manifest.files[i]["bytes"])
                except (OSError, ValueError) as e:  # a file system that cannot map: read it instead
                    log.debug("%s: cannot map data file %d (%s); reading it", self.path, i, e)
                    self._maps[i] = None
            return self._maps[i]

    def verify_mapped(self, wanted: list[int], threads: int | None = None) -> None:
        """Checksum the chunks of mapped tensors (``mapping``) where they lie."""
        recs = [self.manifest.tensors[i] for i in wanted]
        jobs = [(rec, n) for rec in recs for n in range(len(rec.chunks))]
        threads = min(threads or min(8, os.cpu_count() or 1), len(jobs))
        if threads <= 1:
            for job in jobs:
                self._verify_in_place(*job)
            return
        with started_pool(threads, "snapd-check") as pool:
            for fut in [pool.submit(self._verify_in_place, *job) for job in jobs]:
                fut.result()

    def _verify_in_place(self, rec: TensorRecord, n: int) -> None:
        c = rec.chunks[n]
        mapped = self._maps.get(c.file)
        assert mapped is not None, "verify_mapped of a tensor that was not mapped"
        codecs.verify(mapped[c.offset:c.offset + c.stored], c.checksum, self.where(rec, n))

    def where(self, rec: TensorRecord, n: int) -> str:
        c = rec.chunks[n]
        return f"{rec.key} chunk {n} ({self.manifest.files[c.file]['name']} @ {c.offset})"

    def read_chunk(self, rec: TensorRecord, n: int, out: memoryview, keep_planes: bool = False) -> None:
        """Read, check and decode chunk ``n`` of ``rec`` into ``out`` (its raw length); with
        ``keep_planes`` a shuffled chunk stays as byte planes (unshuffled later, on the GPU)."""
        c: Chunk = rec.chunks[n]
        where = self.where(rec, n)
        stored, got = self._stored(c, out)
        if got != c.stored:
            raise FormatError(f"{where}: read {got} of {c.stored} bytes")
        if self.checked:
            codecs.verify(stored, c.checksum, where)
        if c.codec != "raw":
            codecs.decode_into(stored, c.codec, dtypes.itemsize(rec.dtype), c.planes, out, where, keep_planes)

    def _stored(self, c: Chunk, out: memoryview) -> tuple[memoryview | bytes, int]:
        """A chunk's stored bytes (a raw one straight into ``out``) and how many were read (the
        remote tier reads them with a ranged GET instead: snapd.remote.reader)."""
        fd = self._fd(c.file)
        if c.codec == "raw":
            return out, os.preadv(fd, [out], c.offset)
        stored = os.pread(fd, c.stored, c.offset)
        return stored, len(stored)

    def read_run(self, rec: TensorRecord, lo: int, hi: int, out: memoryview) -> None:
        """Chunks ``lo``..``hi - 1`` of ``rec`` into ``out``, their raw bytes back to back (the
        remote tier's reader fetches such a run in a few GETs at once)."""
        pos = 0
        for n in range(lo, hi):
            raw = rec.chunks[n].raw
            self.read_chunk(rec, n, out[pos:pos + raw])
            pos += raw

    def select(self, keys: list[str] | str | None) -> list[int]:
        return select(self.manifest, keys, self.path)

    def read_tensors(self, wanted: list[int], buffer_for: Callable[[int], memoryview],
                     threads: int | None = None, keep_planes: Callable[[int], bool] = lambda i: False,
                     done: Callable[[int], None] | None = None, window_bytes: int | None = None) -> None:
        """Fill ``buffer_for(i)`` (a writable byte view of tensor i's size) for each wanted tensor, on a
        pool a window at a time, ``done(i)`` called as each window is read (snapd.format.windowed_reads)."""
        windowed_reads.read_tensors(self, wanted, buffer_for, threads, keep_planes, done, window_bytes)

    def load(self, keys: list[str] | str | None = None, *, into: Any = None, device: Any = None,
             threads: int | None = None, mmap: bool = True, verify: bool = True) -> Any:
        """The saved tree (or the ``keys`` sub-trees); tensors of the kind saved. ``mmap``: new CPU
        tensors stored raw are the mapped data file (copy-on-write); False reads them into memory.
        ``verify=False`` skips the chunks' checksums (as torch.load and safetensors do: a mapped
        tensor's pages are then read only when used); lengths and the manifest are still checked."""
        self.checked = verify
        try:
            return load_tree(self, keys, into, device, threads, mmap)
        finally:
            self.checked = True

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-check every chunk; return one line per problem (empty when clean)."""
        problems: list[str] = []
        self.checked = True
        for rec in self.manifest.tensors:
            for n, c in enumerate(rec.chunks):
                try:
                    raw = memoryview(bytearray(c.raw))
                    self.read_chunk(rec, n, raw)
                    size = dtypes.itemsize(rec.dtype)
                    if c.digest is not None and _digest_of(raw, size, c.digest) != c.digest:
                        problems.append(f"{self.where(rec, n)}: decodes to bytes whose digest is not the "
                                        f"recorded {c.digest}")
                except FormatError as e:
                    problems.append(str(e))
                if progress:
                    progress(c.stored)
        return problems


def _digest_of(raw: memoryview, itemsize: int, recorded: str) -> str:
    """The digest of a chunk's raw bytes in the form ``recorded`` has (snapd.format.incremental)."""
    from snapd.format.incremental import digest
    from snapd.kernels import shuffle

    planes = recorded.startswith("p") and itemsize > 1
    return digest(shuffle(raw, itemsize) if planes else raw, planes)
