"""Restore without a copy: raw tensors come back over the mapped data file (copy-on-write), still
checked chunk by chunk, and stay valid once retention (or a user's rm -r) deletes the snapshot."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.errors import ChecksumError
from snapd.format.saving import save_state
from snapd.format.writer import Retention


def _mapped_files(address: int) -> list[str]:
    """The files mapped at ``address`` in this process (/proc/self/maps)."""
    hits = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi and len(fields) == 6:
            hits.append(fields[5])
    return hits


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(512, 256, generator=g), "bf": torch.randn(300, 70, generator=g).bfloat16(),
            "ids": np.arange(20_000, dtype=np.int64), "small": torch.ones(3), "n": 7}


def test_raw_tensors_are_the_mapped_file_and_equal_what_was_saved(root) -> None:
    state = _state()
    info = snapd.save(root, "j", state, step=1, codec="raw")
    out = snapd.load(root, "j")
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["bf"], state["bf"])
    assert np.array_equal(out["ids"], state["ids"]) and torch.equal(out["small"], state["small"])
    assert out["n"] == 7 and out["bf"].dtype == torch.bfloat16 and isinstance(out["ids"], np.ndarray)
    for t in (out["w"].data_ptr(), out["bf"].data_ptr(), out["ids"].ctypes.data):
        assert any(f.startswith(str(info.path)) for f in _mapped_files(t)), "not backed by the data file"
    copied = snapd.load(root, "j", mmap=False)
    assert torch.equal(copied["w"], state["w"])
    assert not any(f.startswith(str(info.path)) for f in _mapped_files(copied["w"].data_ptr()))


def test_writing_to_a_mapped_tensor_changes_neither_the_file_nor_another_load(root) -> None:
    state = _state()
    snapd.save(root, "j", state, step=1, codec="raw")
    a = snapd.load(root, "j")
    a["w"].add_(1.0)
    a["ids"][:] = -1
    b = snapd.load(root, "j")
    assert torch.equal(b["w"], state["w"]) and np.array_equal(b["ids"], state["ids"])
    assert torch.equal(a["w"], state["w"] + 1.0)


def test_mapped_tensors_outlive_the_snapshot_being_deleted(root) -> None:
    state = _state()
    info = snapd.save(root, "j", state, step=1, codec="raw", keep_last=1)
    out = snapd.load(root, "j")
    snapd.save(root, "j", {"w": torch.zeros(4)}, step=2, codec="raw", keep_last=1)  # retention removes 1
    assert not Path(info.path).exists()
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["bf"], state["bf"])
    shutil.rmtree(Path(root) / "j")  # and a user's rm -r of the whole job
    assert np.array_equal(out["ids"], state["ids"])


def test_a_corrupted_mapped_chunk_is_refused_by_name(root) -> None:
    state = _state()
    info = snapd.save(root, "j", state, step=1, codec="raw")
    data = sorted(Path(info.path).glob("data-*.bin"))[0]
    with open(data, "r+b") as f:  # flip a byte in the middle of "w"'s bytes
        f.seek(64 + 512 * 256 * 4 // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match=r"w chunk \d+ .*checksum mismatch"):
        snapd.load(root, "j")
    assert torch.equal(snapd.load(root, "j", keys="bf")["bf"], state["bf"])  # the rest still loads
    for mmap in (True, False):  # asked not to verify, it trusts the file (as torch.load does)
        got = snapd.load(root, "j", verify=False, mmap=mmap)["w"]
        assert not torch.equal(got, state["w"])
        assert torch.equal(got.reshape(-1)[:100], state["w"].reshape(-1)[:100])
    with pytest.raises(ChecksumError):  # and the next load verifies again
        snapd.load(root, "j", mmap=False)


def test_compressed_and_split_tensors_are_read_not_mapped(root) -> None:
    g = torch.Generator().manual_seed(1)
    state = {"z": torch.zeros(256, 256), "r": torch.randn(64, 1024, generator=g)}
    info = save_state(root, "j", state, step=1, codec="shuffle-zstd", retention=Retention())
    out = snapd.load(root, "j")
    assert torch.equal(out["z"], state["z"]) and not any(
        f.startswith(str(info.path)) for f in _mapped_files(out["z"].data_ptr()))
    # a tensor whose chunks lie in two data files is read too
    info = save_state(root, "k", state, step=1, codec="raw", retention=Retention(), chunk_bytes=64 << 10,
                      shard_bytes=128 << 10)
    out = snapd.load(root, "k")
    assert torch.equal(out["r"], state["r"]) and torch.equal(out["z"], state["z"])


def test_mapped_tensors_hold_no_descriptor_and_are_unmapped_once_freed(root) -> None:
    import gc
    import os

    info = snapd.save(root, "j", _state(), step=1, codec="raw")
    fds = len(os.listdir("/proc/self/fd"))
    out = snapd.load(root, "j")
    address = out["w"].data_ptr()
    assert len(os.listdir("/proc/self/fd")) == fds  # (Python's mmap would keep one per data file)
    assert any(f.startswith(str(info.path)) for f in _mapped_files(address))
    del out
    gc.collect()
    assert not any(f.startswith(str(info.path)) for f in _mapped_files(address))


def test_restored_tensors_never_share_memory_even_where_the_snapshot_stores_bytes_once(root) -> None:
    from snapd.format import SnapshotReader

    ones = torch.ones(64, 1024)
    snapd.save(root, "j", {"a": ones.clone(), "b": ones.clone() * 2}, step=1, codec="raw")
    # step 2: "a" and "b" both equal step 1's "a": stored once, where step 1 wrote it
    info = snapd.save(root, "j", {"a": ones.clone(), "b": ones.clone()}, step=2, codec="raw")
    spans = {(c["file"], c["offset"]) for t in json.loads((Path(info.path) / "manifest.json").read_text())[
        "tensors"] for c in t["chunks"]}
    assert len(spans) == 1  # (the case under test: one stored chunk, two tensors)
    out = snapd.load(root, "j")
    out["a"].add_(5)
    assert torch.equal(out["b"], ones) and torch.equal(out["a"], ones + 5)
    with SnapshotReader(info.path) as r:  # two loads through one reader: separate memory too
        x, y = r.load(), r.load()
        x["a"].zero_()
        assert torch.equal(y["a"], ones)


@pytest.mark.parametrize("codec", ["raw", "shuffle-lz4"])
def test_data_files_are_written_in_whole_2mib_runs_and_read_back_equal(root, monkeypatch, codec) -> None:
    """Every write but a data file's last ends on a 2 MiB multiple (the page cache then keeps the
    file in large folios that a mapping maps whole), whatever the tensors' sizes; the bytes held
    back between writes all arrive, in order, across shards."""
    import os

    from snapd.format import data_file

    ends: dict[int, list[int]] = {}  # a data file's inode: where each of its writes ended
    real_writev = os.writev

    def writev(fd: int, views: list) -> int:
        n = real_writev(fd, views)
        ends.setdefault(os.fstat(fd).st_ino, []).append(os.lseek(fd, 0, os.SEEK_CUR))
        return n

    monkeypatch.setattr(data_file.os, "writev", writev)
    rng = np.random.default_rng(3)
    state = {f"t{i}": rng.standard_normal(n).astype(np.float32)
             for i, n in enumerate([(3 << 18) + 3, 5, 1000, (2 << 18) - 1, 17, 1 << 19, 123_457, 64])}
    state["small"] = [np.full(k, k, np.int16) for k in range(1, 40)]
    info = save_state(root, "j", state, step=1, codec=codec, chunk_bytes=3 << 20, shard_bytes=5 << 20)
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert len(manifest["files"]) >= 2, "the state should span more than one data file"
    for f in manifest["files"]:
        assert (info.path / f["name"]).stat().st_size == f["bytes"]
    assert ends and all(e % data_file.WRITE_ALIGN == 0 for per_file in ends.values() for e in per_file[:-1])
    out = snapd.load(root, "j")
    for k, v in state.items():
        if k == "small":
            assert all(np.array_equal(a, b) for a, b in zip(out[k], v))
        else:
            assert np.array_equal(out[k], v), k


def _two_ranks(root: Path) -> tuple[np.ndarray, dict[int, np.ndarray], Path]:
    """Step 1 of job "g" saved on 2 ranks (each part delivered as its daemon does; the last one in
    commits): a replicated tensor one part stores for both, and each rank's own values."""
    from concurrent.futures import ThreadPoolExecutor

    from snapd.format.global_commit import deliver
    from snapd.format.jobdir import JobDir
    from snapd.format.rank_parts import roles
    from snapd.format.saving import encode_and_write
    from snapd.format.tree import flatten
    from snapd.format.writer import SnapshotWriter

    jd = JobDir(root, "g")
    jd.open_for_write()
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((256, 128), np.float32)
    own = {r: rng.standard_normal(40_000, np.float32) for r in (0, 1)}
    for rank in (0, 1):
        tree, leaves = flatten({"w": shared, "own": own[rank]})
        w = SnapshotWriter(jd, 1)
        with ThreadPoolExecutor(2) as pool:
            encode_and_write(w, leaves, "raw", pool, 2, 1 << 20, roles=roles(leaves, rank, 2, ("own",)))
        sealed = w.seal(tree=tree, metrics={}, codec="raw", best=None, emergency=False,
                        part={"rank": rank, "world_size": 2, "run": "r1"})
        deliver(jd, w.tmp, sealed, Retention())
    return shared, own, root / "g" / "step-000000000001"


def test_a_step_saved_on_several_ranks_is_mapped_where_one_part_stores_a_tensor_whole(root) -> None:
    shared, own, path = _two_ranks(root)
    for rank in (0, 1):
        out = snapd.load(root, "g", rank=rank)
        assert np.array_equal(out["w"], shared) and np.array_equal(out["own"], own[rank])
        for a in (out["w"], out["own"]):
            assert any(f.startswith(str(path)) for f in _mapped_files(a.ctypes.data)), "not mapped"
        out["w"][:] = 0  # (copy-on-write: the file and the next load keep the saved bytes)
    assert np.array_equal(snapd.load(root, "g", rank=1)["w"], shared)
    copied = snapd.load(root, "g", rank=1, mmap=False)
    assert np.array_equal(copied["own"], own[1])
    assert not any(f.startswith(str(path)) for f in _mapped_files(copied["own"].ctypes.data))


def test_a_corrupted_chunk_of_a_mapped_part_is_refused_by_name(root) -> None:
    shared, own, path = _two_ranks(root)
    holder = next(p for p in sorted(path.glob("rank-*"))
                  if any(t["key"] == "w" and t.get("chunks") for t in json.loads(
                      (p / "manifest.json").read_text())["tensors"]))
    data = sorted(holder.glob("data-*.bin"))[0]
    with open(data, "r+b") as f:
        f.seek(64 + shared.nbytes // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    for rank in (0, 1):
        with pytest.raises(ChecksumError, match=r"w chunk \d+ .*checksum mismatch"):
            snapd.load(root, "g", rank=rank)
        assert np.array_equal(snapd.load(root, "g", rank=rank, keys="own")["own"], own[rank])
