"""A part brought from another node is checked chunk by chunk as its pieces come (each link's range
of a file starts on a chunk), and whatever was not checked on the way is checked from the file: a
flipped byte anywhere in a chunk is caught, whichever way the file was split."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from snapd.daemon.part_files import FileCheck
from snapd.errors import ChecksumError, FormatError
from snapd.format.global_manifest import part_dir
from snapd.format.jobdir import JobDir
from snapd.format.manifest import Manifest, parse
from snapd.format.rank_parts import roles
from snapd.format.retention import Retention
from snapd.format.saving import encode_and_write
from snapd.format.global_commit import deliver
from snapd.format.tree import flatten
from snapd.format.writer import SnapshotWriter
from snapd.peers import wire


@pytest.fixture(scope="module")
def sealed_part(tmp_path_factory) -> tuple[Manifest, str, bytes]:
    """A rank's part of odd-sized tensors in 256 KiB chunks, shuffled and zstd'd (chunks of every
    stored length, at unaligned offsets): its manifest, data file name and bytes."""
    root = tmp_path_factory.mktemp("part")
    jd = JobDir(root, "job")
    jd.open_for_write()
    rng = np.random.default_rng(7)
    state = {"own": {f"t{i}": rng.standard_normal(70_001 * (i + 1), np.float32) for i in range(5)}}
    tree, leaves = flatten(state)
    w = SnapshotWriter(jd, 3)
    with ThreadPoolExecutor(2) as pool:
        encode_and_write(w, leaves, "shuffle-zstd", pool, 2, 256 << 10, roles=roles(leaves, 0, 2, ("own",)))
    sealed = w.seal(tree=tree, metrics={}, codec="shuffle-zstd", best=None, emergency=False,
                    part={"rank": 0, "world_size": 2, "run": "r1"})
    deliver(jd, w.tmp, sealed, Retention())  # (1 of 2 parts: it waits for the other, pending)
    part = next((root / "job").glob(".pending-*")) / part_dir(0)
    m = parse(sealed.to_bytes())
    name = m.files[0]["name"]
    return m, name, (part / name).read_bytes()


class _Peer:
    """A link that answers ``get`` from ``data`` (the network is the integration tests' job)."""

    def __init__(self, data: bytes, flip: int | None = None) -> None:
        self.data = bytearray(data)
        if flip is not None:
            self.data[flip] ^= 0x40

    def pipeline(self, asks, window):
        for ask, _ in asks:
            yield {"t": "data"}, memoryview(self.data)[ask["offset"]:ask["offset"] + ask["length"]]


def _bring(tmp_path, m: Manifest, name: str, data: bytes, split: str, flip: int | None = None) -> bytes:
    """The file as part_fetch brings it: pulled in ranges (or, in no order, written whole as the
    bucket's pieces are), then finished; its bytes."""
    check = FileCheck(m, name)
    peer = _Peer(data, flip)
    out = tmp_path / f"out-{os.urandom(4).hex()}"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        ranges = SPLITS[split](check, len(data))
        if ranges is None:
            os.pwrite(fd, peer.data, 0)
        else:
            with ThreadPoolExecutor(wire.STREAMS) as pool:
                wire.fetch(lambda: peer, pool, {"t": "get"}, check.expect(ranges),
                           lambda piece, at: check.put(fd, piece, at))
        check.finish(fd)
    finally:
        os.close(fd)
    return out.read_bytes()


SPLITS = {
    "at chunks": lambda check, size: wire.split(size, check.cuts),
    "at pieces (chunks cross ranges)": lambda check, size: wire.split(size),
    "one range": lambda check, size: [(0, size)],
    "in no order (as from the bucket)": lambda check, size: None,
}


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch) -> None:
    monkeypatch.setattr(wire, "PIECE_BYTES", 96 << 10)  # (several pieces a chunk, chunks across pieces)


@pytest.mark.parametrize("split", SPLITS)
def test_a_part_brought_whole_is_the_bytes_sent(tmp_path, sealed_part, split) -> None:
    m, name, data = sealed_part
    assert _bring(tmp_path, m, name, data, split) == data


@pytest.mark.parametrize("split", SPLITS)
def test_a_flipped_byte_in_any_chunk_is_caught(tmp_path, sealed_part, split) -> None:
    m, name, data = sealed_part
    chunks = sorted((c.offset, c.stored, f"{t.key} chunk {n}")
                    for t in m.tensors for n, c in enumerate(t.chunks))
    assert len(chunks) > 8
    # bytes at a chunk's start and end, mid-chunk, and at the range boundaries either split makes
    targets = {chunks[0][0], chunks[-1][0] + chunks[-1][1] - 1, chunks[len(chunks) // 2][0] + 5}
    for ranges in (wire.split(len(data)), wire.split(len(data), [c[0] for c in chunks])):
        targets |= {lo for lo, _ in ranges[1:]} | {lo - 1 for lo, _ in ranges[1:]}
    tried = 0
    for at in sorted(targets):
        hit = next((c for c in chunks if c[0] <= at < c[0] + c[1]), None)
        if hit is None:
            continue  # (a header or padding byte: no chunk's)
        with pytest.raises(ChecksumError, match=hit[2]):
            _bring(tmp_path, m, name, data, split, flip=at)
        tried += 1
    assert tried >= 6


def test_a_file_that_came_short_is_refused(tmp_path, sealed_part) -> None:
    m, name, data = sealed_part
    check = FileCheck(m, name)
    out = tmp_path / "short"
    out.write_bytes(data[: len(data) - 1000])
    fd = os.open(out, os.O_RDONLY)
    try:
        with pytest.raises(FormatError):
            check.finish(fd)
    finally:
        os.close(fd)


def test_a_piece_out_of_its_range_order_is_refused(tmp_path, sealed_part) -> None:
    m, name, data = sealed_part
    check = FileCheck(m, name)
    check.expect([(0, len(data))])
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(FormatError, match="expected"):
            check.put(fd, data[4096:8192], 4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [1, 5 << 20, (8 << 20) + 3, 100 << 20])
def test_a_file_is_split_into_contiguous_ranges_at_its_cuts(size) -> None:
    rng = np.random.default_rng(size)
    cuts = sorted(set(rng.integers(1, size, 40).tolist())) if size > 1 else []
    for c in (cuts, []):
        ranges = wire.split(size, c)
        assert 1 <= len(ranges) <= wire.STREAMS
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        starts = [lo for lo, _ in ranges[1:]]
        assert all(lo in c for lo in starts) if c else all(lo % wire.PIECE_BYTES == 0 for lo in starts)
    assert wire.split(0) == []
