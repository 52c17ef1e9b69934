"""The writer's bytes follow docs/FORMAT.md, checked with an independent decoder."""

import json
import struct

import lz4.block
import numpy as np
import xxhash
import zstandard

from snapd.format import save_state
from snapd.kernels import shuffle, unshuffle_into


def test_shuffle_golden_bytes() -> None:
    planes = shuffle(bytes(range(1, 13)), 4)
    assert planes.tolist() == [[1, 5, 9], [2, 6, 10], [3, 7, 11], [4, 8, 12]]
    out = bytearray(12)
    unshuffle_into(list(planes), 4, memoryview(out))
    assert bytes(out) == bytes(range(1, 13))


def _decode_independently(blob: bytes, c: dict, itemsize: int) -> bytes:
    if c["codec"] == "raw":
        return blob
    if c["codec"] == "lz4":
        return lz4.block.decompress(blob, uncompressed_size=c["raw"])
    n = c["raw"] // itemsize
    planes, pos = [], 0
    for length in c["planes"]:
        part = blob[pos:pos + length]
        pos += length
        if length == n:
            planes.append(np.frombuffer(part, np.uint8))
        elif c["codec"] == "shuffle-lz4":
            planes.append(np.frombuffer(lz4.block.decompress(part, uncompressed_size=n), np.uint8))
        else:
            planes.append(np.frombuffer(zstandard.ZstdDecompressor().decompress(part), np.uint8))
    return np.stack(planes).T.tobytes()  # the plain transpose: slow, obviously right


def test_files_follow_the_spec(root) -> None:
    rng = np.random.default_rng(3)
    state = {"w": (rng.standard_normal(200_000) * 0.02).astype(np.float32),
             "ids": np.arange(70_000, dtype=np.int64), "noise": rng.integers(0, 255, 50_000, dtype=np.uint8)}
    for codec in ("raw", "lz4", "shuffle-lz4", "shuffle-zstd"):
        snap = save_state(root, codec, state, step=42, codec=codec, chunk_bytes=64 << 10,
                          shard_bytes=300_000).path
        assert snap.name == "step-000000000042"
        body = json.loads((snap / "manifest.json").read_text())
        assert body["magic"] == "snapd-snapshot" and body["format_version"] == 1
        check = body.pop("checksum")
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        assert check == xxhash.xxh3_64_hexdigest(canon)
        m = len(body["files"])
        assert m >= 2
        for i, f in enumerate(body["files"]):
            assert f["name"] == f"data-{i:05d}-of-{m:05d}.bin"
            data = (snap / f["name"]).read_bytes()
            assert len(data) == f["bytes"] and struct.unpack("<8sII", data[:16]) == (b"SNAPDDAT", 1, i)
        for t in body["tensors"]:
            itemsize = {"w": 4, "ids": 8, "noise": 1}[t["key"]]
            got = b""
            for c in t["chunks"]:
                assert c["offset"] % 64 == 0 and c["raw"] % itemsize == 0 and c["raw"] <= 64 << 10
                blob = (snap / body["files"][c["file"]]["name"]).read_bytes()[c["offset"]:c["offset"]
                                                                              + c["stored"]]
                assert xxhash.xxh3_64_hexdigest(blob) == c["checksum"]
                assert c["stored"] < c["raw"] or c["codec"] == "raw"  # never store a bigger chunk
                got += _decode_independently(blob, c, itemsize)
            assert got == state[t["key"]].tobytes(), (codec, t["key"])
            if codec != "raw" and t["key"] == "noise":
                assert {c["codec"] for c in t["chunks"]} == {"raw"}  # random bytes do not compress
            if codec.startswith("shuffle") and t["key"] == "w":
                c = t["chunks"][0]
                # raw mantissa, packed exponent
                assert c["planes"][0] == c["raw"] // 4 and c["planes"][3] < c["raw"] // 4
