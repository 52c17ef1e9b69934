"""The global commit of a step saved on several ranks (snapd.format.global_commit), in one process:
each rank's writer is a thread, as each node's daemon would be, over a real root on disk.
What a user relies on: a step appears only whole; a missing, late, duplicate or disagreeing part
never commits and says why; parts of two runs never mix; nothing committed before is lost."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd
from snapd.errors import CommitFailed, FormatError, InvalidArgument
from snapd.format import catalog
from snapd.format.global_reader import open_snapshot
from snapd.format.jobdir import JobDir, host_id
from snapd.format.saving import save_leaves
from snapd.format.tree import flatten
from snapd.format.writer import Retention

FULL = np.arange(48, dtype=np.float32).reshape(8, 6)


def part(root: Path, rank: int, step: int, *, world: int = 2, run: str = "r", timeout: float = 10.0,
         n: int = 3, keep_last: int | None = 5) -> object:
    """Rank ``rank``'s part of step ``step``: rows of FULL (sharded), a replicated ``b`` of ``n``
    elements, and its own ``own``."""
    rows = FULL.shape[0] // world
    state = {"w": FULL[rank * rows:(rank + 1) * rows].copy(), "b": np.full(n, step, np.float64),
             "own": np.full(2, 10 * step + rank), "step": step}
    tree, leaves = flatten(state)
    leaves[0].placement = (FULL.shape, (rank * rows, 0), True)
    return save_leaves(root, "j", tree, leaves, step=step, metrics={"loss": float(step)},
                       retention=Retention(keep_last=keep_last), codec="shuffle-zstd", chunk_bytes=64,
                       shard_bytes=1 << 30, threads=2, emergency=False, rank=rank, world_size=world,
                       per_rank=("own",), commit_timeout_s=timeout, run=run)


def together(*calls) -> list:
    """Run each call on its own thread; their results (or exceptions), in order."""
    out: list = [None] * len(calls)

    def run(i, call):
        try:
            out[i] = call()
        except Exception as e:  # (returned, for the test to look at)
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "j").iterdir() if p.name.startswith("."))


def test_parts_commit_once_all_are_durable_and_load_whole_on_any_rank(tmp_path) -> None:
    done = together(lambda: part(tmp_path, 0, 1), lambda: part(tmp_path, 1, 1))
    assert all(d.path.name == "step-000000000001" for d in done), done
    for rank in (0, 1, 3):
        back = snapd.load(tmp_path, "j", rank=rank)
        assert np.array_equal(back["w"], FULL) and back["b"].tolist() == [1.0] * 3
        assert back["own"].tolist() == [10 + rank % 2] * 2 and back["step"] == 1
    with open_snapshot(tmp_path / "j" / "step-000000000001") as r:
        assert r.verify() == []
        assert len(r.global_manifest.tensors["b"].pieces) == 1  # replicated: stored by one rank
    # retention counts global snapshots
    for step in (2, 3, 4):
        together(lambda s=step: part(tmp_path, 0, s, keep_last=2),
                 lambda s=step: part(tmp_path, 1, s, keep_last=2))
    assert [s.step for s in catalog.list_snapshots(tmp_path, "j")] == [3, 4]
    assert hidden(tmp_path) == [".lock"]


def test_a_missing_rank_times_out_naming_it_and_the_last_global_stays(tmp_path) -> None:
    together(lambda: part(tmp_path, 0, 1), lambda: part(tmp_path, 1, 1))
    t0 = time.monotonic()
    with pytest.raises(CommitFailed, match=r"rank 1 of 2 did not deliver its part of step 2 within 1 s"):
        part(tmp_path, 0, 2, timeout=1)
    assert time.monotonic() - t0 < 10
    assert catalog.resolve(tmp_path, "j", "latest").name == "step-000000000001"
    # the late part of that run gets the same reason, and the step stays uncommitted
    with pytest.raises(CommitFailed, match="given up before rank 1's part came: rank 1 of 2 did not"):
        part(tmp_path, 1, 2)
    assert [s.step for s in catalog.list_snapshots(tmp_path, "j")] == [1]
    together(lambda: part(tmp_path, 0, 3), lambda: part(tmp_path, 1, 3))  # the next commit tidies up
    assert hidden(tmp_path) == [".lock"]


def test_ranks_at_different_steps_are_named(tmp_path) -> None:
    out = together(lambda: part(tmp_path, 0, 5, timeout=2), lambda: part(tmp_path, 1, 6, timeout=2))
    assert all(isinstance(e, CommitFailed) for e in out), out
    assert "(rank 1 delivered step 6: the ranks snapshot different steps)" in str(out[0])
    assert catalog.list_snapshots(tmp_path, "j") == []


def test_duplicate_rank_world_size_change_and_disagreeing_shapes_commit_nothing(tmp_path) -> None:
    out = together(lambda: part(tmp_path, 0, 1, timeout=2), lambda: part(tmp_path, 0, 1, timeout=2))
    assert any(isinstance(e, InvalidArgument) and "two processes claim rank 0 of 2" in str(e)
               for e in out), out
    out = together(lambda: part(tmp_path, 0, 8, timeout=2),
                   lambda: (time.sleep(0.5), part(tmp_path, 1, 8, world=4))[1])
    assert isinstance(out[1], CommitFailed) and "world size changed within a run" in str(out[1]), out
    out = together(lambda: part(tmp_path, 0, 7, n=3), lambda: part(tmp_path, 1, 7, n=4))
    assert all(isinstance(e, CommitFailed) for e in out), out
    assert "b: rank 1 holds a replicated float64 tensor of shape [4]" in str(out[0]) + str(out[1])
    assert catalog.list_snapshots(tmp_path, "j") == []


def test_parts_of_two_runs_never_make_one_snapshot(tmp_path) -> None:
    stale = together(lambda: part(tmp_path, 0, 4, run="old", timeout=30),  # waits: its rank 1 is gone
                     lambda: (time.sleep(0.5), part(tmp_path, 0, 4, run="new"), )[1],
                     lambda: (time.sleep(0.5), part(tmp_path, 1, 4, run="new"))[1])
    # the new run commits step 4 from its own parts; the old run's waiting part is then failed
    assert stale[1].path.name == "step-000000000004" and stale[2].path.name == "step-000000000004"
    assert isinstance(stale[0], CommitFailed), stale[0]
    with open_snapshot(tmp_path / "j" / "step-000000000004") as r:
        parts = [json.loads((r.path / p["dir"] / "manifest.json").read_text())["part"]["run"]
                 for p in r.global_manifest.parts]
    assert parts == ["new", "new"]


def test_a_part_swapped_after_the_commit_is_refused(tmp_path) -> None:
    together(lambda: part(tmp_path, 0, 1), lambda: part(tmp_path, 1, 1))
    together(lambda: part(tmp_path / "other", 0, 1), lambda: part(tmp_path / "other", 1, 1))
    snap = tmp_path / "j" / "step-000000000001"
    os.rename(snap / "rank-00001", tmp_path / "gone")
    os.rename(tmp_path / "other" / "j" / "step-000000000001" / "rank-00001", snap / "rank-00001")
    with pytest.raises(FormatError, match="rank 1's part is not the one this global snapshot committed"):
        snapd.load(tmp_path, "j")
    with open_snapshot(snap) as r:
        assert any(p.startswith("rank 1: ") for p in r.verify())


@pytest.mark.parametrize("at, value", [
    (1, [7, 0]),  # a piece of 4 rows at row 7 of 8
    (1, [-1, 0]), (1, [True, 0]), (1, [0.0, 0]), (1, [0]), (1, "00"), (2, [4, None]), (2, [4, 7]),
    (0, 2), (0, -1), (0, False),  # (the rank: of 2, a bool)
])
def test_a_hostile_global_manifest_is_refused(tmp_path, at: int, value) -> None:
    together(lambda: part(tmp_path, 0, 1), lambda: part(tmp_path, 1, 1))
    path = tmp_path / "j" / "step-000000000001" / "manifest.json"
    body = json.loads(path.read_text())
    body["tensors"]["w"]["pieces"][0][at] = value
    from snapd.format.manifest import _checksum

    body["checksum"] = _checksum(body)
    path.write_text(json.dumps(body))
    with pytest.raises(FormatError, match=r"w: piece .* is not inside \[8, 6\]"):
        open_snapshot(path.parent)


def test_a_global_manifest_read_again_is_not_parsed_again(tmp_path) -> None:
    """A peer's ``have`` reads its newest global manifests at every ask (0.3 s each for a 64-rank
    model's): the same bytes give the same parsed manifest; any other bytes are parsed and checked."""
    from snapd.format.global_manifest import parse_any

    together(lambda: part(tmp_path, 0, 1), lambda: part(tmp_path, 1, 1))
    raw = (tmp_path / "j" / "step-000000000001" / "manifest.json").read_bytes()
    first = parse_any(raw)
    assert parse_any(bytes(raw)) is first
    torn = raw.replace(b'"world_size":2', b'"world_size":3')
    with pytest.raises(FormatError, match="checksum mismatch"):
        parse_any(torn)


def test_only_this_hosts_dead_writers_leftovers_are_removed(tmp_path) -> None:
    job = JobDir(tmp_path, "j")
    job.open_for_write()
    dead = job.path / f".tmp-1-999999999-{host_id()}-abcd"
    foreign = job.path / ".tmp-1-999999999-0badf00d-abcd"  # another node's writer: its pid means nothing here
    old_style = job.path / ".tmp-1-999999999-abcd"
    for p in (dead, foreign, old_style):
        p.mkdir()
    job.open_for_write()
    assert not dead.exists() and not old_style.exists() and foreign.exists()
    os.utime(foreign, (time.time() - 2 * 86400,) * 2)
    job.open_for_write()  # (another host's leftovers are looked at once an hour: not yet)
    assert foreign.exists()
    job.remove_leftovers(stale=True)
    assert not foreign.exists()


def test_a_step_saved_again_commits_each_version_and_many_ranks_of_one_process(tmp_path) -> None:
    # each rank learns its step committed from the manifest's parts, read once per version by the
    # process: a second version of the step must be told apart from the first
    first = together(*[lambda r=r: part(tmp_path, r, 1, world=8) for r in range(8)])
    assert all(d.path.name == "step-000000000001" for d in first), first
    again = together(*[lambda r=r: part(tmp_path, r, 1, world=8, n=5) for r in range(8)])
    assert all(d.path.name == "step-000000000001" for d in again), again
    back = snapd.load(tmp_path, "j", rank=3)
    assert np.array_equal(back["w"], FULL) and back["b"].tolist() == [1.0] * 5
    assert hidden(tmp_path) == [".lock"]


def test_a_daemons_start_clears_the_leftovers_of_a_job_that_never_committed(tmp_path) -> None:
    # (a daemon killed during a job's first snapshots leaves temporary directories and no index)
    from snapd.format.root_jobs import clean_root

    job = JobDir(tmp_path, "j")
    job.open_for_write()
    dead = job.path / f".tmp-1-999999999-{host_id()}-abcd"
    dead.mkdir()
    assert not (job.path / "index.json").exists()
    clean_root(tmp_path)
    assert not dead.exists()
