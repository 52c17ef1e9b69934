"""Chunk codecs: turning raw chunk bytes into stored bytes and back.

- ``raw``: stored as is.
- ``lz4``: one LZ4 block (no size prefix; the raw length is in the manifest).
- ``shuffle-lz4`` / ``shuffle-zstd``: the chunk is split into byte planes
  (``snapd.kernels.shuffle``), each plane compressed on its own (LZ4 block or
  one zstd level-1 frame) and stored back to back. A plane that does not
  shrink is stored raw: its stored length then equals its raw length, which
  is how the reader tells.
Whatever the codec, a chunk whose encoding is not smaller than its raw bytes
is stored ``raw``.

Every function here runs on pool threads: LZ4, zstd and xxh3 release the GIL
on large buffers, and each thread keeps its own zstd (de)compressor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash
import zstandard

from snapd.errors import ChecksumError, FormatError
from snapd.kernels import shuffle, unshuffle_into

ZSTD_LEVEL = 1
_local = threading.local()


@dataclass
class Encoded:
    """A chunk ready to write: ``parts`` are written back to back."""

    parts: list[bytes | memoryview]
    stored: int
    raw: int
    codec: str
    checksum: str
    planes: list[int] | None = None
    digest: str | None = None  # of the raw bytes, when hashed for sharing (snapd.format.incremental)


def checksum(parts: list[bytes | memoryview]) -> str:
    if len(parts) == 1:
        return xxhash.xxh3_64_hexdigest(parts[0])
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def _compress(data: memoryview | np.ndarray, algo: str) -> bytes:
    if algo == "lz4":
        return lz4.block.compress(data, store_size=False)
    return _zstd_c().compress(data)


def encode(raw: memoryview | np.ndarray, itemsize: int, codec: str, preshuffled: bool = False) -> Encoded:
    """Encode one chunk of raw bytes (``len(raw)`` a multiple of ``itemsize``).

    ``preshuffled``: the chunk already holds its byte planes (the daemon's GPU
    path shuffled it on the device); the stored bytes are the same as for the
    unshuffled chunk, whichever codec ends up used.
    """
    raw = memoryview(raw).cast("B") if not isinstance(raw, memoryview) else raw
    n = raw.nbytes
    if preshuffled and itemsize > 1:
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
        if codec in ("shuffle-lz4", "shuffle-zstd"):
            done = _encode_planes(planes, n, codec)
            if done is not None:
                return done
        plain = np.empty(n, dtype=np.uint8)  # stored raw (or by a non-shuffling codec): unshuffled bytes
        unshuffle_into(list(planes), itemsize, plain)
        return encode(plain, itemsize, codec)
    if codec == "lz4":
        out = _compress(raw, "lz4")
        if len(out) < n:
            return Encoded([out], len(out), n, "lz4", checksum([out]))
    elif codec in ("shuffle-lz4", "shuffle-zstd"):
        done = _encode_planes(shuffle(raw, itemsize), n, codec)
        if done is not None:
            return done
    elif codec != "raw":
        raise ValueError(f"unknown codec {codec!r}")
    return Encoded([raw], n, n, "raw", checksum([raw]))


def _encode_planes(planes: np.ndarray, n: int, codec: str) -> Encoded | None:
    """Each plane compressed on its own (stored raw when that does not shrink it); None when the
    whole chunk would not shrink."""
    algo = codec.removeprefix("shuffle-")
    parts: list[bytes | memoryview] = []
    lengths = []
    for plane in planes:
        packed = _compress(plane, algo)
        part = packed if len(packed) < plane.size else memoryview(plane)
        parts.append(part)
        lengths.append(len(part))
    if sum(lengths) < n:
        return Encoded(parts, sum(lengths), n, codec, checksum(parts), lengths)
    return None


def decode_into(stored: memoryview | bytes, codec: str, itemsize: int, planes: list[int] | None,
                out: memoryview, where: str, keep_planes: bool = False) -> None:
    """Decode ``stored`` into ``out`` (exactly the chunk's raw length).

    ``keep_planes``: a shuffled chunk is left as its byte planes, back to back
    (a restore onto the GPU unshuffles there).
    """
    n = len(out)
    try:
        if codec == "raw":
            out[:] = stored
        elif codec == "lz4":
            _check_len(lz4.block.decompress(stored, uncompressed_size=n), n, where, out)
        elif codec in ("shuffle-lz4", "shuffle-zstd"):
            algo = codec.removeprefix("shuffle-")
            plane_raw = n // itemsize
            decoded = []
            pos = 0
            for length in planes or []:
                part = memoryview(stored)[pos:pos + length]
                pos += length
                if length == plane_raw:
                    decoded.append(part)
                elif algo == "lz4":
                    decoded.append(_sized(lz4.block.decompress(part, uncompressed_size=plane_raw), plane_raw,
                                          where))
                else:
                    decoded.append(_sized(_zstd_d().decompress(part, max_output_size=plane_raw), plane_raw,
                                          where))
            if keep_planes:
                if len(decoded) != itemsize:
                    raise ChecksumError(f"{where}: {len(decoded)} planes for {itemsize}-byte elements")
                for p, plane in enumerate(decoded):
                    out[p * plane_raw:(p + 1) * plane_raw] = plane
            else:
                unshuffle_into(decoded, itemsize, out)
        else:
            raise FormatError(f"{where}: unknown codec {codec!r}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise ChecksumError(f"{where}: stored bytes do not decode as {codec} ({e})") from None


def _sized(data: bytes, n: int, where: str) -> bytes:
    if len(data) != n:
        raise ChecksumError(f"{where}: decoded to {len(data)} bytes instead of {n}")
    return data


def _check_len(data: bytes, n: int, where: str, out: memoryview) -> None:
    out[:] = _sized(data, n, where)


def verify(stored: memoryview | bytes, expected: str, where: str) -> None:
    got = xxhash.xxh3_64_hexdigest(stored)
    if got != expected:
        raise ChecksumError(f"{where}: checksum mismatch (stored {expected}, computed {got})")
