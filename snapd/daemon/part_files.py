"""The files of a rank's part as ``snapd.daemon.part_fetch`` brings them from another node: its
manifest read piece by piece, its data written piece by piece at their offsets, and every chunk
checked against the manifest's checksum before the part is used (a copy is never trusted): as its
pieces come where they come in order (from a peer, a range of the file a link; no second pass over
bytes no longer in cache), else from the file once written (the bucket's pieces come in any order).
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from snapd.errors import ChecksumError, FormatError
from snapd.format import codecs
from snapd.format.manifest import MANIFEST_NAME, Manifest
from snapd.peers import wire


@dataclass
class _Chunk:
    offset: int
    stored: int
    checksum: str
    where: str


class _Range:
    """The chunks that begin in one range of a file, hashed as the range's pieces come in order."""

    def __init__(self, lo: int, chunks: list[_Chunk]) -> None:
        self.at, self.todo, self.next = lo, chunks, 0  # (todo[next:] not yet begun)
        self.open: list[tuple[_Chunk, Any]] = []  # (begun: each with its hash so far)

    def feed(self, data: memoryview, at: int) -> None:
        if at != self.at:  # (never: one thread puts a range's pieces in order)
            raise FormatError(f"a piece at {at}, where {self.at} was expected")
        end = self.at = at + len(data)
        while self.next < len(self.todo) and self.todo[self.next].offset < end:
            self.open.append((self.todo[self.next], xxhash.xxh3_64()))
            self.next += 1
        still = []
        for c, h in self.open:
            lo, hi = max(c.offset, at), min(c.offset + c.stored, end)
            if lo < hi:
                h.update(data[lo - at:hi - at])
            if c.offset + c.stored > end:
                still.append((c, h))
            elif h.hexdigest() != c.checksum:
                raise ChecksumError(f"{c.where}: checksum mismatch (stored {c.checksum}, computed "
                                    f"{h.hexdigest()})")
        self.open = still

    def left(self) -> list[_Chunk]:
        return [c for c, _ in self.open] + self.todo[self.next:]


class FileCheck:
    """Every chunk of one data file of a part checked against the manifest's checksum: those the
    ranges ``expect`` names hold whole, as their pieces come (``put``: bytes checked while in cache,
    not read back); the rest, or all when pieces come in no order, from the file at ``finish``."""

    def __init__(self, m: Manifest, name: str) -> None:
        index = next(i for i, f in enumerate(m.files) if f["name"] == name)
        self.chunks = sorted((_Chunk(c.offset, c.stored, c.checksum, f"{rec.key} chunk {n}")
                              for rec in m.tensors for n, c in enumerate(rec.chunks) if c.file == index),
                             key=lambda c: c.offset)
        self.cuts = [c.offset for c in self.chunks]
        self._starts: list[int] = []
        self._ranges: list[_Range] = []
        self._rest = list(self.chunks)  # (in no expected range)

    def expect(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``ranges`` (their pieces each to come in order) of the file; returns them."""
        todo = list(self.chunks)
        for lo, hi in ranges:
            mine = [c for c in todo if lo <= c.offset < hi]
            todo = [c for c in todo if not lo <= c.offset < hi]
            self._starts.append(lo)
            self._ranges.append(_Range(lo, mine))
        self._rest = todo
        return ranges

    def put(self, fd: int, data: bytes | memoryview, at: int) -> None:
        """A piece: checked against the chunks it ends (if it lies in an expected range), written."""
        k = bisect.bisect_right(self._starts, at) - 1
        if k >= 0:
            self._ranges[k].feed(memoryview(data), at)
        os.pwrite(fd, data, at)

    def finish(self, fd: int) -> None:
        """The chunks not checked as they came, read from the file (mapped)."""
        left = [c for r in self._ranges for c in r.left()] + self._rest
        if not left:
            return
        if os.fstat(fd).st_size == 0:  # (nothing to map: chunks of no bytes, or bytes missing)
            for c in left:
                codecs.verify(b"", c.checksum, c.where)
            return
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            view = memoryview(mm)
            try:
                for c in left:
                    chunk = view[c.offset:c.offset + c.stored]
                    try:
                        codecs.verify(chunk, c.checksum, c.where)
                    finally:
                        chunk.release()  # (the error's traceback holds it: the map must close)
            finally:
                view.release()


def whole_manifest(read: Callable[[str, int, int], bytes]) -> bytes:
    """A part's manifest, piece by piece."""
    out = b""
    while True:
        piece = read(MANIFEST_NAME, len(out), wire.PIECE_BYTES)
        out += piece
        if len(piece) < wire.PIECE_BYTES:
            return out
        if len(out) > wire.MAX_MANIFEST_BYTES:
            raise FormatError(f"{MANIFEST_NAME} is over {wire.MAX_MANIFEST_BYTES} bytes")
