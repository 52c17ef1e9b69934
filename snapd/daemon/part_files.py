"""The files of a rank's part as ``snapd.daemon.part_fetch`` brings them from another node: its
manifest read piece by piece, its data written piece by piece at their offsets, and every chunk
checked against the manifest's checksum before the part is used (a copy is never trusted).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

from snapd.errors import FormatError
from snapd.format import codecs
from snapd.format.manifest import MANIFEST_NAME, Manifest
from snapd.peers import wire


def check_part(m: Manifest, tmp: Path) -> None:
    """Every chunk of the part in ``tmp`` against its checksum (a FormatError names the first bad
    one), read in place through a mapping of each file."""
    maps: dict[str, mmap.mmap] = {}
    views: dict[str, memoryview] = {}
    try:
        for f in m.files:
            if f["bytes"]:
                with open(tmp / f["name"], "rb") as fh:
                    maps[f["name"]] = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
                views[f["name"]] = memoryview(maps[f["name"]])
        for rec in m.tensors:
            for n, c in enumerate(rec.chunks):
                chunk = views[m.files[c.file]["name"]][c.offset:c.offset + c.stored]
                try:
                    codecs.verify(chunk, c.checksum, f"{rec.key} chunk {n}")
                finally:
                    chunk.release()  # (the error's traceback holds it: the map must close)
    finally:
        for v in views.values():
            v.release()
        for mm in maps.values():
            mm.close()


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


def put_piece(fd: int, data: bytes | memoryview, off: int, size: int) -> None:
    """One piece of a file of ``size`` bytes, at ``off``: exactly as long as a piece there is."""
    if len(data) != min(wire.PIECE_BYTES, size - off):
        raise FormatError(f"got {len(data)} bytes at {off} of {size}")
    os.pwrite(fd, data, off)
