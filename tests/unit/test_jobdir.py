"""Retention, the latest and best marks, the index, leftovers and same-step saves."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import snapd.client as snapd
from snapd.format import JobDir


def _steps(root, job="j"):
    return [s.step for s in snapd.list_snapshots(root, job)]


def test_keep_last_keeps_newest_and_deletes_after_commit(root) -> None:
    for step in range(0, 70, 10):
        snapd.save(root, "j", {"w": np.full(10, step)}, step=step, keep_last=3)
    assert _steps(root) == [40, 50, 60]
    assert sorted(p.name for p in (root / "j").iterdir() if p.name.startswith("step-")) == \
        ["step-000000000040", "step-000000000050", "step-000000000060"]
    assert not [p for p in (root / "j").iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_keep_every_steps_and_best_survive_rotation(root) -> None:
    losses = {0: 5.0, 10: 1.0, 20: 3.0, 30: 4.0, 40: 2.0, 50: 6.0, 60: 7.0}
    for step, loss in losses.items():
        snapd.save(root, "j", {"w": np.zeros(3)}, step=step, metrics={"val_loss": loss}, keep_last=2,
                   keep_every_steps=25, best=("val_loss", "min"))
    infos = snapd.list_snapshots(root, "j")
    assert [s.step for s in infos] == [0, 10, 50, 60]  # 0: every 25; 10: best; 50, 60: last two
    assert [s.step for s in infos if s.best] == [10] and [s.step for s in infos if s.latest] == [60]
    assert snapd.load(root, "j", step="best")["w"].shape == (3,)
    assert snapd.list_snapshots(root, "j")[1].metrics == {"val_loss": 1.0}


def test_best_max_mode_and_nan_metrics(root) -> None:
    for step, acc in [(1, 0.5), (2, float("nan")), (3, 0.9), (4, 0.7)]:
        snapd.save(root, "j", {"w": np.zeros(1)}, step=step, metrics={"acc": acc}, keep_last=1,
                   best=("acc", "max"))
    assert [(s.step, s.best) for s in snapd.list_snapshots(root, "j")] == [(3, True), (4, False)]


def test_latest_follows_commit_order_after_rollback(root) -> None:
    for step in (100, 200, 300):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step)
    snapd.save(root, "j", {"w": np.full(2, 150)}, step=150)  # resumed from an earlier step
    assert snapd.load(root, "j")["w"][0] == 150


def test_same_step_is_replaced_atomically(root) -> None:
    snapd.save(root, "j", {"w": np.full(4, 1.0)}, step=7)
    snapd.save(root, "j", {"w": np.full(4, 2.0)}, step=7)
    assert _steps(root) == [7] and snapd.load(root, "j", step=7)["w"][0] == 2.0
    assert sorted(p.name for p in (root / "j").iterdir()) == [".lock", "index.json", "step-000000000007"]


def test_lost_or_corrupt_index_is_rebuilt(root) -> None:
    for step in (1, 2, 3):
        snapd.save(root, "j", {"w": np.full(2, step)}, step=step)
    (root / "j" / "index.json").write_text("{ torn")
    assert _steps(root) == [1, 2, 3] and snapd.load(root, "j")["w"][0] == 3
    (root / "j" / "index.json").unlink()
    assert snapd.load(root, "j")["w"][0] == 3
    snapd.save(root, "j", {"w": np.full(2, 4)}, step=4)
    assert json.loads((root / "j" / "index.json").read_text())["latest"] == 4


def test_dead_writers_leftovers_are_removed_and_never_listed(root) -> None:
    snapd.save(root, "j", {"w": np.zeros(2)}, step=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (root / "j" / f".tmp-2-{dead}-abcd").mkdir()
    (root / "j" / f".tmp-2-{dead}-abcd" / "data-00000.bin").write_bytes(b"partial")
    (root / "j" / ".trash-step-000000000000-beef").mkdir()
    live = root / "j" / f".tmp-3-{os.getpid()}-0123"  # a live writer's (ours): must survive
    live.mkdir()
    assert _steps(root) == [1]
    snapd.save(root, "j", {"w": np.zeros(2)}, step=2)
    names = sorted(p.name for p in (root / "j").iterdir())
    assert names == [".lock", live.name, "index.json", "step-000000000001", "step-000000000002"]


def test_snapshot_dir_without_manifest_is_not_listed(root) -> None:
    snapd.save(root, "j", {"w": np.zeros(2)}, step=1)
    (root / "j" / "step-000000000009").mkdir()
    assert _steps(root) == [1]


def test_two_processes_writing_one_job(root) -> None:
    code = ("import sys, numpy as np, snapd.client as c\n"
            "base = int(sys.argv[2])\n"
            "for i in range(12):\n"
            "    c.save(sys.argv[1], 'shared', {'w': np.full(50_000, base + i, np.float32)}, step=base + i,"
            " keep_last=None)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(b)], cwd="/") for b in (0, 1000)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    steps = _steps(root, "shared")
    assert sorted(steps) == list(range(12)) + list(range(1000, 1012))
    index = json.loads((root / "shared" / "index.json").read_text())
    assert sorted(e["step"] for e in index["history"]) == sorted(steps)
    for s in steps:
        assert snapd.load(root, "shared", step=s)["w"][0] == s


def test_jobdir_refuses_unwritable_root(tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(Exception, match="cannot create job directory"):
        JobDir(f, "j").open_for_write()


@pytest.mark.parametrize("name", ["shared-job\n", "job\n\n", "step\r", "\u0661\u0662"])
def test_a_job_name_must_match_whole_not_up_to_a_final_newline(root, name) -> None:
    from snapd.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="invalid job name"):
        snapd.save(root, name, {"w": np.zeros(1)}, step=1)
    assert not list(root.iterdir())


def test_a_directory_named_like_a_step_but_not_quite_is_not_listed(root) -> None:
    snapd.save(root, "j", {"w": np.zeros(1)}, step=1)
    (root / "j" / "step-000000000002\n").mkdir()
    (root / "j" / "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0663").mkdir()
    assert _steps(root) == [1]
