"""A chunk of a stored tensor: where its bytes lie, how they are coded, and the format's rules for it
(docs/FORMAT.md sections 2-3), checked on every chunk a manifest lists before any byte is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

from snapd.errors import FormatError

CODECS = ("raw", "lz4", "shuffle-lz4", "shuffle-zstd")
MAX_CHUNK_RAW_BYTES = 64 << 20


@dataclass
class Chunk:
    file: int  # index into Manifest.files
    offset: int  # byte offset of the stored bytes in that file
    stored: int  # stored length
    raw: int  # length once decoded
    codec: str
    checksum: str  # xxh3_64 of the stored bytes, 16 hex digits
    planes: list[int] | None = None  # shuffle codecs: stored length of each byte plane
    digest: str | None = None  # BLAKE3-128 of the raw bytes ("r") or of their planes ("p"), if hashed



def _count(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise FormatError(f"{what} must be an integer >= 0, got {v!r}")
    return v


def check_chunk(key: str, c: Chunk, size: int, files: list[dict]) -> None:
    """One chunk of tensor ``key`` (elements of ``size`` bytes) against the format's rules."""
    if c.codec not in CODECS:
        raise FormatError(f"{key}: unknown codec {c.codec!r} (known: {', '.join(CODECS)})")
    if c.file >= len(files):
        raise FormatError(f"{key}: chunk names data file {c.file}, but there are {len(files)}")
    if c.offset + c.stored > files[c.file]["bytes"]:
        raise FormatError(f"{key}: chunk at offset {c.offset} + {c.stored} runs past the end of "
                          f"{files[c.file]['name']} ({files[c.file]['bytes']} bytes)")
    if c.raw > MAX_CHUNK_RAW_BYTES or c.raw % size:
        raise FormatError(f"{key}: chunk raw length {c.raw} is over {MAX_CHUNK_RAW_BYTES} or not a whole "
                          f"number of {size}-byte elements")
    if c.codec == "raw" and c.stored != c.raw:
        raise FormatError(f"{key}: raw chunk stores {c.stored} bytes for {c.raw}")
    if not isinstance(c.checksum, str) or not re.fullmatch(r"[0-9a-f]{16}", c.checksum):
        raise FormatError(f"{key}: chunk checksum {c.checksum!r} is not 16 hex digits")
    if c.digest is not None and not (isinstance(c.digest, str)
                                     and re.fullmatch(r"[rp][0-9a-f]{32}", c.digest)):
        raise FormatError(f"{key}: chunk digest {c.digest!r} is not 'r' or 'p' and 32 hex digits")
    if c.codec.startswith("shuffle-"):
        if not isinstance(c.planes, list) or len(c.planes) != size:
            raise FormatError(f"{key}: shuffled chunk must list {size} plane lengths, got {c.planes!r}")
        for p in c.planes:
            _count(p, f"{key}: plane length")
            if p > c.raw // size:
                raise FormatError(f"{key}: plane of {p} bytes is longer than its raw {c.raw // size}")
        if sum(c.planes) != c.stored:
            raise FormatError(f"{key}: plane lengths add to {sum(c.planes)}, not the stored {c.stored}")


def check_overlaps(tensors: list[tuple[str, list[Chunk]]], files: list[dict]) -> None:
    """No two chunks of a snapshot share a byte of a data file (``tensors``: key, chunks), unless
    they are one stored chunk, referred to twice (the same span and checksum: tensors of the same
    bytes, stored once by an incremental snapshot)."""
    spans = sorted((c.file, c.offset, c.offset + c.stored, c.checksum, key)
                   for key, chunks in tensors for c in chunks)
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2] and a[1:4] != b[1:4]:
            raise FormatError(f"chunks of {a[4]} and {b[4]} overlap in {files[a[0]]['name']} "
                              f"(bytes {b[1]}..{a[2]})")
