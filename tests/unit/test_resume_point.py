"""The resume point survives what happens to a job directory: snapshots committed out of order,
a damaged or missing index, a deleted manifest, a failure after the commit's rename."""

import errno
import json
import os

import numpy as np
import pytest

import snapd.client as snapd
from snapd.cli import main as cli
from snapd.format import JobDir
from snapd.format import index as jobindex
from snapd.format.saving import save_state
from snapd.format.writer import Retention, SnapshotWriter


def _save_taken(root, step: int, taken: float, emergency: bool = False, keep_last: int | None = None,
                metrics: dict | None = None, best=None) -> None:
    """A snapshot handed over at ``taken`` (as the daemon records it), committed now."""
    real = SnapshotWriter.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        self.taken_unix_s = taken
    SnapshotWriter.__init__ = init
    try:
        save_state(root, "j", {"w": np.full(4, step, np.int64)}, step=step, emergency=emergency,
                   metrics=metrics, retention=Retention(keep_last=keep_last, best=best))
    finally:
        SnapshotWriter.__init__ = real


def test_emergency_snapshot_stays_latest_when_older_ones_commit_after_it(root) -> None:
    # the daemon's queue: 1 and 2 flushed, 5 (emergency) jumps ahead of 3 and 4 handed over before it
    for step, taken in [(1, 1.0), (2, 2.0), (5, 5.0), (3, 3.0), (4, 4.0)]:
        _save_taken(root, step, taken, emergency=step == 5, keep_last=3)
    infos = snapd.list_snapshots(root, "j")
    assert [s.step for s in infos if s.latest] == [5]
    assert snapd.load(root, "j")["w"][0] == 5
    # the older ones persist, rotated by when taken; listed as taken, the last one latest
    assert [(s.step, s.latest) for s in infos] == [(3, False), (4, False), (5, True)]
    os.unlink(root / "j" / "index.json")  # rebuilt from the manifests: the same answer
    assert snapd.load(root, "j")["w"][0] == 5


def test_a_run_resumed_from_an_earlier_step_makes_its_snapshots_latest(root) -> None:
    for step in (100, 200):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step, keep_last=2)
    snapd.save(root, "j", {"w": np.full(2, 150)}, step=150, keep_last=2)
    assert snapd.load(root, "j")["w"][0] == 150
    assert [(s.step, s.latest) for s in snapd.list_snapshots(root, "j")] == [(200, False), (150, True)]


def test_a_step_without_manifest_is_not_listed_and_latest_falls_back(root) -> None:
    for step in (1, 2, 3):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step)
    os.unlink(root / "j" / "step-000000000003" / "manifest.json")
    assert [s.step for s in snapd.list_snapshots(root, "j")] == [1, 2]
    assert snapd.load(root, "j")["w"][0] == 2


def test_a_damaged_latest_manifest_falls_back_to_the_newest_whole_one(root) -> None:
    for step in (1, 2):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step)
    m = root / "j" / "step-000000000002" / "manifest.json"
    m.write_bytes(m.read_bytes().replace(b'"step": 2', b'"step": 9'))  # fails its checksum
    assert snapd.load(root, "j")["w"][0] == 1
    assert cli(["verify", str(root / "j")]) == 1


@pytest.mark.parametrize("garbage", [b"null", b"[]", b"42", b'"x"', b"{}", b'{"magic": "snapd-index"}',
                                     b"\xff\xfe", b'{"magic": "snapd-index", "history": 7}'])
def test_an_index_of_any_garbage_is_rebuilt_and_snapshots_go_on(root, garbage) -> None:
    for step in (1, 2):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step, metrics={"loss": 3.0 - step},
                   best=("loss", "min"))
    (root / "j" / "index.json").write_bytes(garbage)
    assert [(s.step, s.latest, s.best) for s in snapd.list_snapshots(root, "j")] == [(1, False, False),
                                                                                 (2, True, True)]
    assert snapd.load(root, "j", step="best")["w"][0] == 2
    assert cli(["verify", str(root / "j")]) == 1  # verify names the damaged index
    snapd.save(root, "j", {"w": np.full(2, 3)}, step=3, metrics={"loss": 5.0}, best=("loss", "min"))
    assert [s.step for s in snapd.list_snapshots(root, "j") if s.best] == [2]
    assert cli(["verify", str(root / "j")]) == 0  # the next commit rewrote it


def test_a_hand_made_index_with_a_valid_checksum_but_bad_entries_is_rebuilt(root) -> None:
    snapd.save(root, "j", {"w": np.full(2, 1)}, step=1)
    body = json.loads((root / "j" / "index.json").read_bytes())
    body.pop("checksum")
    body["history"][0]["step"] = "one"
    import xxhash
    body["checksum"] = xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode())
    (root / "j" / "index.json").write_text(json.dumps(body))
    assert [s.step for s in snapd.list_snapshots(root, "j")] == [1]


def test_best_survives_a_lost_index(root) -> None:
    for step, loss in [(1, 2.0), (2, 1.0), (3, 4.0)]:
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step, metrics={"val": loss}, best=("val", "min"),
                   keep_last=1)
    os.unlink(root / "j" / "index.json")
    infos = snapd.list_snapshots(root, "j")
    assert [(s.step, s.latest, s.best) for s in infos] == [(2, False, True), (3, True, False)]
    assert snapd.load(root, "j", step="best")["w"][0] == 2


def test_index_rebuilt_from_disk_matches_the_one_written(root) -> None:
    for step in (10, 20, 30, 40):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step, metrics={"acc": step % 30},
                   best=("acc", "max"), keep_last=3)
    before = [(s.step, s.latest, s.best, s.metrics, s.emergency) for s in snapd.list_snapshots(root, "j")]
    os.unlink(root / "j" / "index.json")
    assert [(s.step, s.latest, s.best, s.metrics, s.emergency) for s in snapd.list_snapshots(root,
                                                                                             "j")] == before


def test_disk_full_while_writing_the_index_reports_the_commit_that_happened(root, monkeypatch) -> None:
    snapd.save(root, "j", {"w": np.full(2, 1)}, step=1)

    def full(job, index):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(jobindex, "save", full)
    done = save_state(root, "j", {"w": np.full(2, 2)}, step=2)  # no FlushError: it is committed
    assert done.entry.step == 2 and done.path.is_dir()
    monkeypatch.undo()
    assert snapd.load(root, "j")["w"][0] == 2


@pytest.mark.parametrize("stage", ["data", "manifest", "install"])
def test_a_failure_at_each_step_of_a_commit_keeps_the_previous_snapshot(root, monkeypatch, stage) -> None:
    from snapd.errors import FlushError
    from snapd.format import data_file as data_file_mod
    from snapd.format import writer as writer_mod

    snapd.save(root, "j", {"w": np.full(1000, 1.0)}, step=1, keep_last=1)
    real_fsync = os.fsync

    def broken(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")
    if stage == "data":
        monkeypatch.setattr(data_file_mod.DataFile, "finish", lambda self: broken())
    elif stage == "manifest":
        monkeypatch.setattr(writer_mod, "fsync_dir", broken)
    else:
        monkeypatch.setattr(JobDir, "install", lambda self, tmp, step: broken())
    with pytest.raises(FlushError):
        save_state(root, "j", {"w": np.full(1000, 2.0)}, step=2, retention=Retention(keep_last=1))
    monkeypatch.undo()
    assert os.fsync is real_fsync
    assert [s.step for s in snapd.list_snapshots(root, "j")] == [1]
    assert snapd.load(root, "j")["w"][0] == 1.0
    assert not [p for p in (root / "j").iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_commit_fsyncs_data_and_manifest_before_the_rename_and_renames_the_same_directory(
        root, monkeypatch) -> None:
    from snapd.format import data_file as data_file_mod
    from snapd.format import jobdir as jobdir_mod
    from snapd.format import writer as writer_mod

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    class Spy:  # the writer's and the job directory's os, recording what is fsynced and renamed
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        @staticmethod
        def rename(a, b, **kw):
            events.append(("rename", f"{a} -> {b}"))
            return real_rename(a, b, **kw)
    monkeypatch.setattr(writer_mod, "os", Spy())
    monkeypatch.setattr(data_file_mod, "os", Spy())
    monkeypatch.setattr(jobdir_mod, "os", Spy())
    jd = JobDir(root, "j")
    jd.open_for_write()
    w = SnapshotWriter(jd, 7)
    from snapd.format.saving import encode_and_write
    from snapd.format.tree import flatten
    from concurrent.futures import ThreadPoolExecutor
    _, leaves = flatten({"a": np.arange(3 << 20, dtype=np.float32), "b": np.ones(5)})
    with ThreadPoolExecutor(2) as pool:
        encode_and_write(w, leaves, "raw", pool, 2)
    tmp_inode = os.stat(w.tmp).st_ino
    done = w.commit(tree=_tree(), metrics=None, codec="raw", retention=Retention())
    assert os.stat(done.path).st_ino == tmp_inode  # renamed into place, not copied
    install = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith("step-000000000007"))
    synced = [p for kind, p in events[:install] if kind == "fsync"]
    assert any(p.endswith("manifest.json") for p in synced)
    assert sum("data-" in p for p in synced) == len(list(done.path.glob("data-*.bin")))
    manifest_at = next(i for i, e in enumerate(events) if e[0] == "fsync" and e[1].endswith("manifest.json"))
    data_at = [i for i, e in enumerate(events) if e[0] == "fsync" and "data-" in e[1]]
    assert max(data_at) < manifest_at < install  # data, then the manifest, then the rename
    assert any(kind == "fsync" and p == str(root / "j") for kind, p in events[install:])  # the rename itself


def _tree():
    return {"t": "dict", "k": ["a", "b"], "v": [{"t": "tensor", "i": 0}, {"t": "tensor", "i": 1}]}


def test_loads_leave_no_descriptor_open(root) -> None:
    state = {f"t{i}": np.random.default_rng(i).standard_normal(300_000).astype(np.float32) for i in range(24)}
    from snapd.format.saving import save_state as save
    save(root, "j", state, step=1, codec="raw", shard_bytes=4 << 20)  # many data files, many chunks
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        out = snapd.load(root, "j")
    assert all(np.array_equal(out[k], state[k]) for k in state)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_raw_chunk_that_was_changed_on_disk_fails_its_checksum(root) -> None:
    from snapd.errors import ChecksumError, FormatError

    snapd.save(root, "j", {"w": np.arange(4096, dtype=np.float32)}, step=1, codec="raw")
    data = next((root / "j" / "step-000000000001").glob("data-*.bin"))
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises((ChecksumError, FormatError), match="checksum"):
        snapd.load(root, "j")


def test_a_key_prefix_selects_at_name_boundaries_only(root) -> None:
    state = {"model": {"w": np.ones(2)}, "model_ema": {"w": np.zeros(2)}, "model.x": np.full(2, 7)}
    snapd.save(root, "j", state, step=1)
    part = snapd.load(root, "j", keys="model")
    assert "model_ema" not in part and set(part) == {"model", "model.x"}
    assert set(snapd.load(root, "j", keys="model_ema")) == {"model_ema"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["index.json", "step-000000000002/manifest.json"])
def test_a_fifo_planted_as_index_or_manifest_never_hangs_a_reader(root, what) -> None:
    for step in (1, 2):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step)
    (root / "j" / what).unlink()
    os.mkfifo(root / "j" / what)
    steps = [s.step for s in snapd.list_snapshots(root, "j")]
    assert steps == ([1, 2] if what == "index.json" else [1])
    assert snapd.load(root, "j")["w"][0] == steps[-1]
    assert cli(["verify", str(root / "j")]) == 1
    snapd.save(root, "j", {"w": np.full(2, 3)}, step=3)  # a commit goes on (and replaces a FIFO index)
    assert snapd.load(root, "j")["w"][0] == 3


def test_a_removed_step_is_remembered_through_commits_and_a_bad_record_rebuilds_the_index(root) -> None:
    from snapd.format.retention import remove_step

    for step in (1, 2, 3):
        _save_taken(root, step, 1000.0 + step)
    assert remove_step(JobDir(root, "j"), 3) == 1003.0 and remove_step(JobDir(root, "j"), 3) is None
    _save_taken(root, 4, 1004.0)  # (a commit rewrites the index: the removal stays recorded)
    index = jobindex.load(JobDir(root, "j"))
    assert [e.step for e in index.history] == [1, 2, 4] and index.removed == {3: 1003.0}
    for step in range(10, 10 + jobindex.MAX_REMOVED):  # the oldest removals are forgotten first
        index.history.append(entry := jobindex.Entry(step, f"step-{step:012d}", 0.0, 0, 0,
                                                      taken_unix_s=2000.0 + step))
        index.forget(entry)
    assert len(index.removed) == jobindex.MAX_REMOVED and 3 not in index.removed
    body = json.loads((root / "j" / "index.json").read_bytes())
    body.pop("checksum")
    body["removed"] = [[3, "then"]]
    import xxhash
    body["checksum"] = xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode())
    (root / "j" / "index.json").write_text(json.dumps(body))
    with pytest.raises(Exception, match="malformed index"):
        jobindex.parse_index((root / "j" / "index.json").read_bytes())
    assert [s.step for s in snapd.list_snapshots(root, "j")] == [1, 2, 4]  # (rebuilt from the manifests)
