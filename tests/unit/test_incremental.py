"""Incremental snapshots: unchanged chunks are not written again, every snapshot stays whole
whichever others are deleted, and nothing is shared that is not byte for byte the same."""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.cli import main as cli
from snapd.format import SnapshotReader
from snapd.format.incremental import Previous, Shared, digest
from snapd.format.jobdir import JobDir
from snapd.format.saving import save_state
from snapd.format.writer import Retention, SnapshotWriter

MIB = 1 << 20


def _manifest(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def _written(path: Path) -> int:
    """Bytes of the data files this snapshot wrote itself (not linked from an earlier one)."""
    return sum(f["bytes"] for f in _manifest(path)["files"] if "shard" not in f)


def _fine_tuning(step: int) -> dict:
    """A frozen base (8 MiB of fp32, 2 MiB of bf16) and small adapters with their optimizer state,
    changed every step."""
    g = torch.Generator().manual_seed(0)
    base = {f"block{i}.w": torch.randn(512, 1024, generator=g) for i in range(4)}
    base["emb"] = torch.randn(1024, 1024, generator=g).bfloat16()
    lora = {f"block{i}.{ab}": torch.full((1024, 8) if ab == "A" else (8, 1024), float(step))
            for i in range(4) for ab in "AB"}
    return {"base": base, "lora": lora, "optim": {k: v * 0.5 for k, v in lora.items()}, "step": step}


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_a_frozen_base_is_written_once_and_every_step_loads_bit_exact(root) -> None:
    changed = sum(t.numel() * t.element_size() for part in ("lora", "optim")
                  for t in _fine_tuning(0)[part].values())
    paths = {}
    for step in range(1, 6):
        info = snapd.save(root, "ft", _fine_tuning(step), step=step, codec="raw", keep_last=None)
        paths[step] = info.path
        if step == 1:
            assert _written(info.path) > 10 * MIB  # (the first snapshot writes everything)
        else:
            assert _written(info.path) <= 1.1 * changed + 4096, step  # the adapters, plus alignment
            assert _manifest(info.path)["format_version"] == 3
    for step, path in paths.items():
        assert _equal(snapd.load(root, "ft", step), _fine_tuning(step)), step
        with SnapshotReader(path) as r:
            assert r.verify() == []


def test_deleting_any_snapshot_never_breaks_another(root) -> None:
    for step in range(1, 5):
        snapd.save(root, "ft", _fine_tuning(step), step=step, codec="shuffle-zstd", keep_last=2,
                   metrics={"loss": 1.0 if step != 1 else 0.1}, best=("loss", "min"))
    names = sorted(p.name for p in (root / "ft").glob("step-*"))
    assert names == ["step-000000000001", "step-000000000003", "step-000000000004"]  # best, last 2
    shutil.rmtree(root / "ft" / "step-000000000001")  # the step that wrote the base: a user's rm -r
    shutil.rmtree(root / "ft" / "step-000000000003")
    assert _equal(snapd.load(root, "ft", 4), _fine_tuning(4))
    assert cli(["verify", str(root / "ft")]) == 0
    snapd.save(root, "ft", _fine_tuning(5), step=5, codec="shuffle-zstd", keep_last=2)
    shutil.rmtree(root / "ft" / "step-000000000004")
    assert _equal(snapd.load(root, "ft"), _fine_tuning(5))


def test_same_bytes_of_another_dtype_or_length_are_not_shared(root) -> None:
    x = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)
    snapd.save(root, "j", {"a": x}, step=1, codec="shuffle-zstd")
    # the same bytes as int32 (another element size in the planes' sense: no) and as float16 pairs
    info = snapd.save(root, "j", {"a": x.view(np.int32), "b": x.view(np.float16)}, step=2,
                      codec="shuffle-zstd")
    assert not any("shard" in f for f in _manifest(info.path)["files"])
    out = snapd.load(root, "j")
    assert out["a"].dtype == np.int32 and np.array_equal(out["a"], x.view(np.int32))
    assert out["b"].dtype == np.float16 and out["b"].tobytes() == x.tobytes()  # (bytes: NaNs among them)


def test_a_damaged_shared_file_is_found_in_every_snapshot_that_refers_to_it(root, capsys) -> None:
    for step in (1, 2):
        snapd.save(root, "ft", _fine_tuning(step), step=step, codec="raw")
    data = root / "ft" / "step-000000000001" / "data-00000-of-00001.bin"
    with open(data, "r+b") as f:  # (in place: the inode both snapshots hold)
        f.seek(4096)
        f.write(b"\xff" * 8)
    assert cli(["verify", str(root / "ft")]) == 1
    out = capsys.readouterr().out
    assert out.count("BAD") == 2 and "base.block0.w chunk 0" in out


def test_a_chunk_whose_bytes_no_longer_match_its_digest_is_reported(root) -> None:
    info = snapd.save(root, "j", {"a": np.arange(1 << 16, dtype=np.int64)}, step=1, codec="raw")
    m = _manifest(info.path)
    m["tensors"][0]["chunks"][0]["digest"] = digest(b"other bytes")  # a manifest that lies (re-signed)
    from snapd.format.manifest import _checksum

    m["checksum"] = _checksum(m)
    (Path(info.path) / "manifest.json").write_text(json.dumps(m))
    with SnapshotReader(info.path) as r:
        problems = r.verify()
    assert len(problems) == 1 and "digest" in problems[0] and "a chunk 0" in problems[0]


def test_a_previous_file_mostly_changed_is_copied_not_linked(root) -> None:
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(1 << 20, generator=g), torch.arange(4096.0)
    snapd.save(root, "j", {"big": big, "small": small}, step=1, codec="raw")
    info = snapd.save(root, "j", {"big": big + 1, "small": small}, step=2, codec="raw")
    files = _manifest(info.path)["files"]
    assert not any("shard" in f for f in files)  # small's 16 KiB came along as a copy
    assert all(os.stat(Path(info.path) / f["name"]).st_nlink == 1 for f in files)
    out = snapd.load(root, "j")
    assert torch.equal(out["big"], big + 1) and torch.equal(out["small"], small)
    with SnapshotReader(info.path) as r:
        assert r.verify() == []


def test_a_file_replaced_after_it_was_read_is_not_shared(root) -> None:
    job = JobDir(root, "j")
    job.open_for_write()
    snapd.save(root, "j", {"a": np.arange(1 << 16, dtype=np.int64)}, step=1, codec="raw")
    from snapd.format.incremental import previous

    prev = previous(job)
    assert isinstance(prev, Previous) and prev.chunks
    src = next(iter(prev.sources.values()))
    os.rename(src.path, str(src.path) + ".old")  # the path now names another file
    Path(src.path).write_bytes(Path(str(src.path) + ".old").read_bytes())
    writer = SnapshotWriter(job, 2)
    rec = writer.add_tensor("a", "numpy", "int64", (1 << 16,), 1 << 19)
    raw = np.arange(1 << 16, dtype=np.int64).view(np.uint8)
    dig = digest(raw)
    hit = prev.find(dig, "int64", raw.nbytes)
    assert hit is not None
    writer.write_chunk(rec, Shared(hit[0], hit[1], dig, raw, 8, "raw", False))
    assert not writer.links.linked and writer.written_bytes > raw.nbytes  # written, not linked
    writer.abort()
    prev.close()


def test_off_writes_every_byte(root) -> None:
    save_state(root, "j", _fine_tuning(1), step=1, codec="raw", retention=Retention(), incremental=False)
    info = save_state(root, "j", _fine_tuning(2), step=2, codec="raw", retention=Retention(),
                      incremental=False)
    assert _written(info.path) > 10 * MIB and "digest" not in json.dumps(_manifest(info.path))


def test_each_rank_shares_with_its_own_part(root) -> None:
    def rank_state(rank: int, step: int) -> dict:
        g = torch.Generator().manual_seed(rank)
        return {"frozen": torch.randn(1 << 18, generator=g), "live": torch.full((1024,), float(step))}

    def save(step: int) -> None:
        errors = []

        def one(rank: int) -> None:
            try:
                save_state(root, "dist", rank_state(rank, step), step=step, codec="raw", rank=rank,
                           world_size=2, per_rank=("frozen", "live"), run="r1")
            except Exception as e:  # (reported below)
                errors.append(e)
        threads = [threading.Thread(target=one, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    save(1)
    save(2)
    for rank in range(2):
        part = root / "dist" / "step-000000000002" / f"rank-{rank:05d}"
        assert _written(part) < 64 << 10 and _manifest(part)["format_version"] == 3
        out = snapd.load(root, "dist", rank=rank)
        assert _equal(out, rank_state(rank, 2))


@pytest.mark.parametrize("bad", [{"shard": 0}, {"shard": -1, "shared_from": "x"},
                                 {"shard": 0, "shared_from": 5}])
def test_a_manifest_that_says_shared_wrongly_is_refused(root, bad) -> None:
    from snapd.errors import FormatError
    from snapd.format.manifest import _checksum

    info = snapd.save(root, "j", {"a": np.arange(4096)}, step=1, codec="raw")
    m = _manifest(info.path)
    m["files"][0].update(bad)
    m["format_version"] = 3 if "shared_from" in bad else 1
    m["checksum"] = _checksum(m)
    (Path(info.path) / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"files\[0\]"):
        SnapshotReader(info.path)


def test_a_step_directory_pointed_elsewhere_shares_nothing_from_there(root) -> None:
    secret = {"w": np.random.default_rng(1).standard_normal(1 << 18)}
    victim = snapd.save(root, "victim", secret, step=1, codec="raw")
    snapd.save(root, "j", {"w": np.zeros(4)}, step=1, codec="raw")
    step1 = root / "j" / "step-000000000001"
    shutil.rmtree(step1)
    os.symlink(victim.path, step1)  # the job's latest now names another job's (user's) snapshot
    info = snapd.save(root, "j", secret, step=2, codec="raw")
    assert not any("shard" in f for f in _manifest(info.path)["files"])
    assert all(os.stat(Path(info.path) / f["name"]).st_nlink == 1 for f in _manifest(info.path)["files"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_data_file_another_user_owns_is_never_linked(root) -> None:
    state = {"w": np.random.default_rng(1).standard_normal(1 << 18)}
    first = snapd.save(root, "j", state, step=1, codec="raw")
    for f in Path(first.path).glob("data-*.bin"):
        os.chown(f, 54321, 54321)
    info = snapd.save(root, "j", state, step=2, codec="raw")
    assert not any("shard" in f for f in _manifest(info.path)["files"])
    assert np.array_equal(snapd.load(root, "j")["w"], state["w"])


def test_a_tensor_that_changes_entirely_is_hashed_every_other_snapshot(root) -> None:
    def digests(step: int) -> list[bool]:
        m = _manifest(root / "j" / f"step-{step:012d}")
        return [("digest" in c) for c in m["tensors"][0]["chunks"]]
    for step in range(1, 6):
        save_state(root, "j", {"w": np.full(1 << 16, step, np.float32)}, step=step, codec="raw",
                   chunk_bytes=64 << 10)
    # 1: first (all hashed, nothing to compare with); 2: compared with 1, all hashed, nothing shared;
    # 3: so only the first chunk; 4: 3 was not hashed whole, so all again; 5: the first only
    assert [sum(digests(s)) for s in range(1, 6)] == [4, 4, 1, 4, 1]
    assert all(np.array_equal(snapd.load(root, "j", s)["w"], np.full(1 << 16, s, np.float32))
               for s in range(1, 6))


def test_a_users_disk_usage_counts_a_shared_file_once(root) -> None:
    from snapd.daemon.quotas import disk_usage

    for step in (1, 2, 3):
        snapd.save(root, "ft", _fine_tuning(step), step=step, codec="raw", keep_last=None)
    blocks = {(st.st_ino, st.st_blocks) for p in (root / "ft").rglob("*") if p.is_file()
              for st in [p.stat()]}
    assert disk_usage(root) == sum(b * 512 for _, b in blocks)  # each file once, however many links
    assert disk_usage(root) < 2 * 11 * MIB  # (three snapshots of 11 MiB, the base stored once)
