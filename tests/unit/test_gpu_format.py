"""The format side of the GPU path, on the CPU (runs in every CI run).

The daemon's GPU copy shuffles each writer chunk on the device when the
job's codec shuffles, and a restore onto a GPU unshuffles there; both rely
on the NumPy twins here producing exactly the bytes of the CPU path. These
tests pin that down: a snapshot written from pre-shuffled chunks is the same
snapshot, byte for byte, as one written from the plain tensors.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from snapd.format import codecs, dtypes
from snapd.format.jobdir import JobDir
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.reader import SnapshotReader
from snapd.format.saving import encode_and_write
from snapd.format.to_device import _segments, _unshuffle_on_host
from snapd.format.tree import flatten
from snapd.format.writer import Retention, SnapshotWriter
from snapd.kernels import shuffle_chunks, unshuffle_chunks
from snapd.kernels.numpy_backend import NumpyBackend

CHUNK = 64 << 10


def _state(rng: np.random.Generator) -> dict:
    return {
        "w": rng.standard_normal((300, 257)).astype(np.float32),  # several chunks and an odd tail
        "moments": (rng.standard_normal(70_001) * 1e-3).astype(np.float32),
        "noise": rng.integers(0, 2**32, 40_000, dtype=np.uint32),  # incompressible: chunks stored raw
        "ids": rng.integers(0, 50, 9_999, dtype=np.int64),
        "half": rng.standard_normal(33_333).astype(np.float16),
        "flags": rng.integers(0, 2, 1000).astype(bool),
        "empty": np.zeros(0, np.float32),
    }


@pytest.mark.parametrize("codec", ["shuffle-zstd", "shuffle-lz4", "lz4", "raw"])
def test_preshuffled_chunk_encodes_to_the_same_stored_bytes(codec: str) -> None:
    rng = np.random.default_rng(1)
    for data, k in [(rng.standard_normal(4096).astype(np.float32), 4),
                    (rng.integers(0, 2**32, 4096, dtype=np.uint32), 4),
                    (rng.standard_normal(1000).astype(np.float16), 2),
                    (rng.integers(0, 9, 999, dtype=np.int64), 8)]:
        raw = data.view(np.uint8)
        want = codecs.encode(raw, k, codec)
        got = codecs.encode(shuffle_chunks(raw, k, raw.nbytes), k, codec, preshuffled=True)
        assert (got.codec, got.checksum, got.planes) == (want.codec, want.checksum, want.planes)
        assert b"".join(map(bytes, got.parts)) == b"".join(map(bytes, want.parts))


def _write(root, job: str, leaves: list, codec: str, tree: dict) -> dict:
    jobdir = JobDir(root, job)
    jobdir.open_for_write()
    writer = SnapshotWriter(jobdir, 1)
    with ThreadPoolExecutor(2) as pool:
        encode_and_write(writer, leaves, codec, pool, 2, CHUNK)
    done = writer.commit(tree=tree, metrics={}, codec=codec, retention=Retention())
    return json.loads((done.path / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("codec", ["shuffle-zstd", "shuffle-lz4"])
def test_snapshot_from_preshuffled_chunks_is_byte_identical(root, codec: str) -> None:
    """What the daemon writes after the GPU shuffled its host buffer equals what the CPU path writes."""
    state = _state(np.random.default_rng(2))
    tree, plain = flatten(state)
    _, staged = flatten({k: v.copy() for k, v in state.items()})
    for leaf in staged:  # what the GPU leaves in the host buffer: each writer chunk as byte planes
        leaf.data[:] = shuffle_chunks(leaf.data, dtypes.itemsize(leaf.dtype), CHUNK)
        leaf.preshuffled = True
    want, got = _write(root, "cpu", plain, codec, tree), _write(root, "gpu", staged, codec, tree)
    assert [t["chunks"] for t in got["tensors"]] == [t["chunks"] for t in want["tensors"]]
    for name in [f["name"] for f in want["files"]]:
        assert next((root / "cpu").glob(f"*/{name}")).read_bytes() == \
            next((root / "gpu").glob(f"*/{name}")).read_bytes()
    with SnapshotReader(next(p for p in (root / "gpu").iterdir() if (p / MANIFEST_NAME).exists())) as r:
        out = {}
        r.read_tensors(list(range(len(r.manifest.tensors))),
                       lambda i: memoryview(out.setdefault(i,
                                                           np.empty(r.manifest.tensors[i].nbytes, np.uint8))))
        for i, rec in enumerate(r.manifest.tensors):
            assert out[i].tobytes() == np.ascontiguousarray(state[rec.key]).tobytes(), rec.key


def _kept_planes(root, codec: str, seed: int):
    """(record, decoded bytes with shuffled chunks left as planes, saved bytes) for each tensor of a
    snapshot written with ``codec``, read as a restore onto a GPU reads it."""
    state = _state(np.random.default_rng(seed))
    tree, leaves = flatten(state)
    _write(root, "job", leaves, codec, tree)
    path = next(p for p in (root / "job").iterdir() if (p / MANIFEST_NAME).exists())
    with SnapshotReader(path) as r:
        for i, rec in enumerate(r.manifest.tensors):
            host = np.empty(rec.nbytes, np.uint8)
            r.read_tensors([i], lambda _, host=host: memoryview(host), keep_planes=lambda _: True)
            yield rec, host, np.ascontiguousarray(state[rec.key]).tobytes()


def test_planes_kept_for_the_device_unshuffle_to_the_saved_bytes(root) -> None:
    """A restore onto a GPU reads shuffled chunks as planes; unshuffling them (the NumPy twin of
    the device kernel) gives back the saved bytes, raw-stored chunks included."""
    for rec, host, saved in _kept_planes(root, "shuffle-zstd", 3):
        assert _unshuffle_on_host(rec, host).tobytes() == saved, rec.key


def test_numpy_pack_shuffles_each_source_in_writer_chunks() -> None:
    rng = np.random.default_rng(4)
    srcs = [rng.standard_normal(n).astype(np.float32) for n in (5, 40_000, 1)]
    offsets = [0, 64, 64 + 160_000 + 64]
    out = np.zeros(offsets[-1] + 64, np.uint8)
    NumpyBackend().pack(srcs, offsets, out, [4, 4, 4], CHUNK)
    for s, off in zip(srcs, offsets):
        planes = out[off:off + s.nbytes]
        assert planes.tobytes() == shuffle_chunks(s.view(np.uint8), 4, CHUNK).tobytes()
        back = np.empty(s.nbytes, np.uint8)
        unshuffle_chunks(planes, 4, CHUNK, None, back)
        assert back.tobytes() == s.tobytes()


def test_device_unshuffle_segments_give_the_saved_bytes(root, host_kernel) -> None:
    """What a restore onto a GPU launches (to_device._segments: unshuffle the chunks stored shuffled,
    copy the others) run by the CUDA kernel's source built for the host: the saved bytes."""
    for rec, host, saved in _kept_planes(root, "shuffle-lz4", 4):
        out = np.random.default_rng(len(saved)).integers(0, 256, rec.nbytes, dtype=np.uint8)  # poison
        host_kernel(_segments(rec, host.ctypes.data, out.ctypes.data))
        assert out.tobytes() == saved, rec.key
