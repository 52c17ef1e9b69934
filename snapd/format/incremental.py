"""Incremental snapshots: a chunk whose bytes are those of a chunk of the job's previous snapshot
is not written again (docs/FORMAT.md section 9).

Identity is exact: the chunk's BLAKE3 digest (128 bits, a cryptographic hash: no data, however
crafted, makes two different chunks share one) together with its dtype and raw length. A shared
chunk keeps its stored bytes where the previous snapshot wrote them: that data file is hard-linked
into the new snapshot's directory, so every snapshot stays a self-contained directory and deleting
any one (retention, ``best``, a user's ``rm -r``) leaves the others whole. A previous data file is
linked only while at least half of it is still referred to, so a snapshot never holds much more
disk than its own bytes.

Hashing costs a pass over the bytes (BLAKE3: ~3.5 GB/s a core here, against ~0.7 GB/s of disk), so
a tensor that changed entirely in the previous snapshot has only its first chunk hashed this time
(and all of them the time after): training that changes everything pays for half its chunks.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snapd.errors import FormatError
from snapd.format import codecs
from snapd.format.chunks import Chunk
from snapd.format.global_manifest import part_dir
from snapd.format.index import INDEX_NAME, parse_index
from snapd.format.jobdir import JobDir, read_regular
from snapd.format.manifest import MANIFEST_NAME, Manifest, TensorRecord, parse

log = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"[rp][0-9a-f]{32}\Z")
MIN_LIVE = 0.5  # a previous data file is linked only while this much of it is referred to


def digest(data: memoryview | np.ndarray | bytes, planes: bool = False) -> str:
    """BLAKE3-128 of a chunk's bytes, ``r`` + hex for the raw bytes, ``p`` + hex for its byte planes
    (the GPU path hands the encoder planes: the same chunk then has another digest, never a
    colliding one)."""
    import blake3  # (the daemon's and the writer's: a client that only loads never imports it)

    return ("p" if planes else "r") + blake3.blake3(data).hexdigest(length=16)


@dataclass
class Source:
    """A data file of the previous snapshot, held open so that the file linked is this one (linked
    by ``name`` in the directory ``dir_fd`` holds, never through a path that could be swapped)."""

    path: Path
    name: str
    dir_fd: int
    fd: int
    shard: int  # the number in its header
    bytes: int
    live: float  # the share of its bytes the previous snapshot refers to


@dataclass
class Shared:
    """A chunk that need not be written: ``chunk`` of ``source`` holds its bytes. ``encode`` makes
    the chunk after all (the link failed) while its raw bytes are still there."""

    source: Source
    chunk: Chunk
    digest: str
    raw: memoryview | np.ndarray
    itemsize: int
    codec: str
    preshuffled: bool

    def encode(self) -> codecs.Encoded:
        enc = codecs.encode(self.raw, self.itemsize, self.codec, self.preshuffled)
        enc.digest = self.digest
        return enc


@dataclass
class Previous:
    """The chunks of the job's previous snapshot (or of this rank's part of it) that may be shared;
    with no previous snapshot (``manifest`` None) every chunk is hashed, for the next to share."""

    path: Path | None = None
    manifest: Manifest | None = None
    dir_fd: int = -1
    sources: dict[int, Source] = field(default_factory=dict)
    chunks: dict[tuple[str, str, int], tuple[int, Chunk]] = field(default_factory=dict)
    by_key: dict[str, TensorRecord] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, manifest: Manifest, dir_fd: int, owner: int) -> Previous:
        """``path``'s data files (``dir_fd`` holds the directory) that ``owner``'s uid owns."""
        prev = cls(path, manifest, dir_fd, by_key={t.key: t for t in manifest.tensors})
        used = [0] * len(manifest.files)
        for rec in manifest.tensors:
            for c in rec.chunks:
                used[c.file] += c.stored
        for i, info in enumerate(manifest.files):
            live = used[i] / max(1, info["bytes"])
            if live < MIN_LIVE:
                continue
            try:
                fd = os.open(info["name"], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError:
                continue
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != info["bytes"] or st.st_uid != owner:
                os.close(fd)  # (a file another user planted is never linked into this job)
                continue
            prev.sources[i] = Source(path / info["name"], info["name"], dir_fd, fd, info.get("shard", i),
                                     info["bytes"], live)
        for rec in manifest.tensors:
            for c in rec.chunks:
                if c.digest is not None and c.file in prev.sources:
                    prev.chunks[(c.digest, rec.dtype, c.raw)] = (c.file, c)
        return prev

    def hash_chunks(self, key: str, n_chunks: int) -> int:
        """How many of tensor ``key``'s chunks to hash: all, unless the previous snapshot, compared
        with its own previous one, hashed all of its chunks and shared none (it changed entirely):
        then the first only."""
        rec = self.by_key.get(key)
        if self.manifest is None or self.manifest.compared_with is None or rec is None or not rec.chunks:
            return n_chunks
        files = self.manifest.files
        if any(c.digest is None or "shard" in files[c.file] for c in rec.chunks):
            return n_chunks
        return 1

    def find(self, dig: str, dtype: str, raw: int) -> tuple[Source, Chunk] | None:
        hit = self.chunks.get((dig, dtype, raw))
        return None if hit is None else (self.sources[hit[0]], hit[1])

    def close(self) -> None:
        for s in self.sources.values():
            os.close(s.fd)
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
        self.sources.clear()
        self.chunks.clear()


def encode_or_share(prev: Previous | None, raw: memoryview | np.ndarray, itemsize: int, dtype: str,
                    codec: str, preshuffled: bool, hashed: bool) -> codecs.Encoded | Shared:
    """A chunk encoded, or (its digest found in ``prev``) the stored chunk it can share; ``hashed``:
    record its digest (for the next snapshot) even when nothing is shared now."""
    if not hashed:
        return codecs.encode(raw, itemsize, codec, preshuffled)
    dig = digest(raw, preshuffled and itemsize > 1)
    hit = prev.find(dig, dtype, memoryview(raw).nbytes) if prev is not None else None
    if hit is not None:
        return Shared(hit[0], hit[1], dig, raw, itemsize, codec, preshuffled)
    enc = codecs.encode(raw, itemsize, codec, preshuffled)
    enc.digest = dig
    return enc


def previous(job: JobDir, rank: int = 0, world_size: int = 1) -> Previous:
    """The job's latest committed snapshot (this rank's part of it on several ranks, if it was taken
    on as many), ready to share chunks with; an empty one if there is none or it cannot be read."""
    try:
        latest = parse_index(read_regular(job.path / INDEX_NAME)).latest
    except (OSError, FormatError):
        return Previous()
    if latest is None:
        return Previous()
    names = [latest.name] + ([part_dir(rank)] if world_size > 1 else [])
    path = job.path.joinpath(*names)
    dir_fd = -1
    try:
        owner = os.stat(job.path).st_uid
        dir_fd = _open_dirs(job.path, names)
        manifest = parse(read_regular(MANIFEST_NAME, dir_fd), str(path / MANIFEST_NAME))
        part = manifest.part or {"rank": 0, "world_size": 1}
        if (part["rank"], part["world_size"]) != (rank, world_size):
            raise FormatError(f"a part of rank {part['rank']} of {part['world_size']}")
    except (OSError, FormatError) as e:  # (a global manifest on one rank, a part on none: no sharing)
        log.debug("%s: no previous snapshot to share chunks with (%s)", path, e)
        if dir_fd >= 0:
            os.close(dir_fd)
        return Previous()
    return Previous.open(path, manifest, dir_fd, owner)


def _open_dirs(top: Path, names: list[str]) -> int:
    """A descriptor of ``top/names...``, each step refusing a symbolic link (a step directory
    pointed elsewhere must not bring another user's files into this job)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        try:
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd

