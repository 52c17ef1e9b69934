"""Reading a snapshot from the remote tier: the same readers as for a local directory
(snapd.format.reader, snapd.format.global_reader), each chunk fetched with its own ranged GET (on
the reader's threads, so in parallel) and checked against its checksum as it arrives. A partial
restore (``keys=``, one rank's view of a global snapshot) fetches only the chunks it needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from snapd.errors import FormatError, SnapshotNotFound
from snapd.format import codecs, dtypes
from snapd.format.chunks import Chunk
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.global_reader import GlobalReader
from snapd.format.manifest import MANIFEST_NAME, TensorRecord, parse
from snapd.format.pools import started_pool
from snapd.format.reader import SnapshotReader
from snapd.remote.store import Store

log = logging.getLogger(__name__)

GET_THREADS = 8
GET_BYTES = 16 << 20  # the most one GET asks for (runs of raw chunks)


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
        self._maps = {}  # (never filled: objects in a bucket are fetched, not mapped)
        self._mapped_at = set()
        self.checked = True

    def _stored(self, c: Chunk, out: memoryview) -> tuple[memoryview | bytes, int]:
        key = f"{self.key}/{self.manifest.files[c.file]['name']}"
        if c.codec == "raw" and len(out) == c.stored:  # straight into the tensor's bytes
            return out, self.store.get_range_into(key, c.offset, out)
        got = self.store.get_range(key, c.offset, c.stored)
        return got, len(got)

    def mapping(self, i: int) -> memoryview | None:
        return None  # (objects in a bucket are fetched, not mapped)

    def read_tensors(self, wanted: list[int], buffer_for: Callable[[int], memoryview],
                     threads: int | None = None, *args: Any, **kw: Any) -> None:
        # GETs wait on the network, not a core: more of them in flight than the cores (the local
        # reader's bound) keep the link busy
        super().read_tensors(wanted, buffer_for, threads or GET_THREADS, *args, **kw)

    def _jobs(self, window: list[int], buffer_for: Callable[[int], memoryview],
              keep_planes: Callable[[int], bool]) -> list[tuple]:
        """As the local reader's, but each run of a tensor's chunks lying back to back in one object
        is one GET of up to ``GET_BYTES`` (``n`` a range of chunks): a request costs as much for
        4 MiB as for 16. Raw runs land in the tensor's memory as they come; others are decoded."""
        jobs: list[tuple] = []
        for i in window:
            rec = self.manifest.tensors[i]
            jobs += _runs(rec, 0, len(rec.chunks), buffer_for(i), keep_planes(i))
        return jobs

    def read_run(self, rec: TensorRecord, lo: int, hi: int, out: memoryview) -> None:
        """Chunks ``lo``..``hi - 1`` of ``rec`` into ``out`` (their raw bytes, back to back): one GET
        per run, ``GET_THREADS`` at once (a DCP piece of a shard: snapd.dcp)."""
        jobs = _runs(rec, lo, hi, out, False)
        if len(jobs) == 1:
            self.read_chunk(*jobs[0])
            return
        with started_pool(min(GET_THREADS, len(jobs)), "snapd-get") as pool:
            for f in [pool.submit(self.read_chunk, *job) for job in jobs]:
                f.result()

    def read_chunk(self, rec: TensorRecord, n: int | range, out: memoryview,  # type: ignore[override]
                   keep_planes: bool = False) -> None:
        if not isinstance(n, range):  # (verify: one chunk at a time)
            return super().read_chunk(rec, n, out, keep_planes)
        chunks = [rec.chunks[k] for k in n]
        key = f"{self.key}/{self.manifest.files[chunks[0].file]['name']}"
        stored_bytes = sum(c.stored for c in chunks)
        if all(c.codec == "raw" for c in chunks):
            data, got = out, self.store.get_range_into(key, chunks[0].offset, out)
        else:
            data = memoryview(self.store.get_range(key, chunks[0].offset, stored_bytes))
            got = len(data)
        pos = raw = 0
        for k, c in zip(n, chunks):  # each chunk checked on its own: an error names the chunk
            where = self.where(rec, k)
            if got < pos + c.stored:
                raise FormatError(f"{where}: read {max(0, got - pos)} of {c.stored} bytes")
            stored = data[pos:pos + c.stored]
            if self.checked:
                codecs.verify(stored, c.checksum, where)
            if data is not out:
                dst = out[raw:raw + c.raw]
                if c.codec == "raw":
                    dst[:] = stored
                else:
                    codecs.decode_into(stored, c.codec, dtypes.itemsize(rec.dtype), c.planes, dst, where,
                                       keep_planes)
            pos += c.stored
            raw += c.raw
        return None

    def close(self) -> None:
        pass


def _runs(rec: TensorRecord, lo: int, hi: int, buf: memoryview, keep: bool) -> list[tuple]:
    """``read_chunk``'s arguments for chunks ``lo``..``hi - 1`` (``buf`` holds their raw bytes from
    chunk ``lo`` on), grouped in runs one GET fetches."""
    jobs: list[tuple] = []
    pos = run_stored = 0
    for n in range(lo, hi):
        c = rec.chunks[n]
        prev = jobs[-1] if jobs else None
        if prev is not None and _follows(rec.chunks[prev[1][-1]], c) and run_stored + c.stored <= GET_BYTES:
            jobs[-1] = (rec, range(prev[1][0], n + 1), buf[pos - len(prev[2]):pos + c.raw], keep)
            run_stored += c.stored
        else:
            jobs.append((rec, range(n, n + 1), buf[pos:pos + c.raw], keep))
            run_stored = c.stored
        pos += c.raw
    return jobs


def _follows(a: Chunk, b: Chunk) -> bool:
    return a.file == b.file and a.offset + a.stored == b.offset


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
