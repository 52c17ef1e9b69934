"""Which of a job's snapshots the peers take for its newest (issue 26): the one taken last, as the
index orders ``latest``, so that a run resumed from an earlier step is neither forgotten nor
resumed past. And a single process's snapshot as a peer's copy: held as rank 0 of 1 only when its
manifest says so, kept without any announcement, taken up again from disk, and committed whole on
a replacement node by the format's commit rule."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from snapd.client.local import load
from snapd.daemon.whole_snapshots import Copy, newest_first
from snapd.errors import InvalidArgument
from snapd.format import index as jobindex
from snapd.format.jobdir import JobDir, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse
from snapd.format.retention import Retention
from snapd.format.saving import encode_and_write
from snapd.format.spread_commit import adopt_whole
from snapd.format.tree import flatten
from snapd.format.writer import SnapshotWriter
from snapd.peers.replicas import ReplicaStore


def snapshot(root: Path, job: str, step: int, value: float,
             taken: float | None = None) -> tuple[Path, Manifest]:
    """A single process's snapshot of ``step``, committed under ``root`` as the daemon does."""
    jd = JobDir(root, job)
    jd.open_for_write()
    tree, leaves = flatten({"w": np.full(3000, value, np.float32), "step": step})
    w = SnapshotWriter(jd, step)
    w.taken_unix_s = taken
    with ThreadPoolExecutor(2) as pool:
        encode_and_write(w, leaves, "raw", pool, 2, 1 << 20)
    done = w.commit(tree=tree, metrics={}, codec="raw", retention=Retention(keep_last=5))
    return done.path, parse((done.path / MANIFEST_NAME).read_bytes())


def fill(store: ReplicaStore, job: str, path: Path, m: Manifest) -> None:
    store.begin(job, m.step, 0, 1, "", "n0", (path / MANIFEST_NAME).read_bytes())
    for f in m.files:
        store.write(job, m.step, 0, f["name"], 0, memoryview((path / f["name"]).read_bytes()))
    store.end(job, m.step, 0)


def test_a_single_process_snapshot_is_held_only_as_rank_0_of_1(tmp_path) -> None:
    path, m = snapshot(tmp_path / "src", "solo", 1, 1.0)
    raw = (path / MANIFEST_NAME).read_bytes()
    store = ReplicaStore(memory_bytes=1 << 30, committed=lambda job, step: False)  # (no announcements)
    for rank, world, run in ((1, 1, ""), (0, 2, ""), (0, 1, "r1")):  # (its manifest names no part)
        with pytest.raises(InvalidArgument, match="another part"):
            store.begin("solo", 1, rank, world, run, "n0", raw)
    with pytest.raises(InvalidArgument, match="another part"):
        store.begin("solo", 2, 0, 1, "", "n0", raw)  # (the manifest says step 1)
    fill(store, "solo", path, m)
    r = store.get("solo", 1, 0)
    assert r is not None and r.whole and r.checksum == m.checksum
    # a newer step held whole drops the older one: nothing needs announcing for it to count
    path2, m2 = snapshot(tmp_path / "src", "solo", 2, 2.0)
    fill(store, "solo", path2, m2)
    assert [x.step for x in store.held("solo")] == [2]


def test_a_copy_kept_on_disk_is_taken_up_again_as_a_single_process_snapshot(tmp_path) -> None:
    path, m = snapshot(tmp_path / "src", "solo", 3, 3.0)
    store = ReplicaStore(memory_bytes=0, directory=tmp_path / "replicas")
    fill(store, "solo", path, m)
    assert store.get("solo", 3, 0).where == "disk"
    again = ReplicaStore(memory_bytes=0, directory=tmp_path / "replicas")
    again.load_disk()
    r = again.get("solo", 3, 0)
    assert r is not None and r.whole and r.checksum == m.checksum
    assert again.read(r, m.files[0]["name"], 0, 100) == (path / m.files[0]["name"]).read_bytes()[:100]


def test_a_snapshot_brought_whole_commits_by_the_rule_with_retention_and_the_index(tmp_path) -> None:
    old, _ = snapshot(tmp_path / "node", "solo", 1, 1.0)  # (an older step of the job on this disk)
    path, m = snapshot(tmp_path / "src", "solo", 4, 4.0)
    job = JobDir(tmp_path / "node", "solo")
    tmp = job.new_tmp_dir(4)
    for f in path.iterdir():
        (tmp / f.name).write_bytes(f.read_bytes())
    final = adopt_whole(job, tmp, m, Retention(keep_last=1), "peer")
    assert final == job.path / snapshot_name(4) and not tmp.exists() and not old.exists()
    assert jobindex.load(job).latest.step == 4
    back = load(tmp_path / "node", "solo")
    assert back["step"] == 4 and float(back["w"][0]) == 4.0
    # a step already here is left as it is (another restore brought it first)
    tmp = job.new_tmp_dir(4)
    (tmp / MANIFEST_NAME).write_bytes(b"not this one")
    assert adopt_whole(job, tmp, m, Retention(keep_last=1), "peer") == final
    assert parse((final / MANIFEST_NAME).read_bytes()).checksum == m.checksum


def test_the_copy_kept_is_the_snapshot_taken_last_not_the_highest_step(tmp_path) -> None:
    """A run resumed from step 4 after step 7 takes step 5 later: its copy replaces step 7's, and a
    restore's survey puts it first; two runs' copies of one step are told apart by checksum."""
    store = ReplicaStore(memory_bytes=1 << 30)
    old, m7 = snapshot(tmp_path / "a", "solo", 7, 7.0, taken=1000.0)
    fill(store, "solo", old, m7)
    new, m5 = snapshot(tmp_path / "b", "solo", 5, 5.0, taken=2000.0)
    store.begin("solo", 5, 0, 1, "", "n0", (new / MANIFEST_NAME).read_bytes())
    assert [r.step for r in store.held("solo")] == [7]  # (until step 5's copy is whole)
    fill(store, "solo", new, m5)
    assert [r.step for r in store.held("solo")] == [5]
    fill(store, "solo", old, m7)  # (the older run's step 7 again, from a node that lagged): not kept
    assert [r.step for r in store.held("solo")] == [5]
    _, m5b = snapshot(tmp_path / "c", "solo", 5, 5.5, taken=1500.0)  # (a third run's step 5)
    a, c = Copy(1, "tcp://a", m5.checksum, 2000.0), Copy(3, "tcp://c", m5.checksum, 2000.0)
    steps = {5: [Copy(2, "tcp://b", m5b.checksum, 1500.0), c, a], 7: [Copy(0, "", m7.checksum, 1000.0)]}
    found = newest_first(steps)
    assert [(n, [c.endpoint for c in copies]) for n, copies in found] == \
        [(5, ["tcp://a", "tcp://c"]), (5, ["tcp://b"]), (7, [""])]
    assert [n for n, _ in newest_first(steps, 7)] == [7]


def test_a_peers_taken_time_that_is_not_a_finite_number_counts_as_oldest() -> None:
    from snapd.daemon.survey_steps import _taken

    assert _taken(1500) == 1500.0 and _taken(2.5) == 2.5
    for bad in (10 ** 400, float("nan"), float("inf"), "9e9", True, None, [1]):
        assert _taken(bad) == 0.0, bad


def test_a_peers_queue_sends_each_jobs_newest_first_a_single_process_by_when_it_was_taken(tmp_path) -> None:
    from snapd.daemon.outgoing import Outgoing
    from snapd.daemon.peer_sender import Sender
    from snapd.peers.directory import PeerInfo

    def out(job: str, step: int, rank: int = 0, whole: bool = False, taken: float = 0.0) -> Outgoing:
        return Outgoing(job, step, rank, 1 if whole else 2, "" if whole else "r", tmp_path, tmp_path, b"", 1,
                        whole=whole, taken=taken)

    s = Sender(PeerInfo("tcp://127.0.0.1:1", "n1"), None, "n0", lambda n: None)  # (never started)
    old7, new5 = out("solo", 7, whole=True, taken=100.0), out("solo", 5, whole=True, taken=200.0)
    p1, p3, q2 = out("g", 1), out("g", 3), out("h", 2, rank=1)
    s.replicate = [old7, p1, new5, p3, q2]
    assert s._pick() is new5  # (each job's newest; of those, the one queued first)
    assert old7.newness < new5.newness and p1.newness < p3.newness  # (so its send drops old7, and p3's p1)
    s.replicate = [old7, p1, p3, q2]
    assert s._pick() is old7  # (alone of its job: step 7 of the run before is still its newest here)
    s.replicate = [p1, p3, q2]
    assert s._pick() is p3


def test_a_run_resumed_from_an_earlier_step_is_heard_and_never_commits_with_parts_made_before(
        tmp_path, rank_part) -> None:
    from snapd.daemon.peer_commits import PartBook

    book = PartBook(tmp_path / "a", lambda task: Retention())
    for step in range(10, 20):  # (more steps than the book keeps)
        book.announce("j", step, 2, "r1", 1, "b", rank_part(tmp_path / "b", "j", step, 1, 2)[1].to_bytes())
    book.announce("j", 5, 2, "r1", 1, "b", rank_part(tmp_path / "b", "j", 5, 1, 2)[1].to_bytes())
    assert set(book.known("j", 5, 2, "r1")) == {1}  # (the run went back to step 4: step 5 is its newest)
    # step 18 made again in the same run: this node's new part forgets rank 1's first one, which
    # must not commit with it; rank 1's new part, announced before or after, is kept
    book.mine("j", 18, 2, "r1", 0, "a", rank_part(tmp_path / "a", "j", 18, 0, 2, taken=1000.0)[1])
    book.announce("j", 18, 2, "r1", 1, "b",
                  rank_part(tmp_path / "b1", "j", 18, 1, 2, taken=1000.5)[1].to_bytes())
    book.mine("j", 18, 2, "r1", 0, "a", rank_part(tmp_path / "a2", "j", 18, 0, 2, taken=5000.0)[1])
    assert set(book.known("j", 18, 2, "r1")) == {0}
    book.announce("j", 18, 2, "r1", 1, "b",
                  rank_part(tmp_path / "b2", "j", 18, 1, 2, taken=5000.2)[1].to_bytes())
    assert set(book.known("j", 18, 2, "r1")) == {0, 1}
    book.announce("j", 17, 2, "r1", 1, "b",
                  rank_part(tmp_path / "b3", "j", 17, 1, 2, taken=9000.1)[1].to_bytes())  # (before ours)
    book.mine("j", 17, 2, "r1", 0, "a", rank_part(tmp_path / "a3", "j", 17, 0, 2, taken=1.0)[1])
    book.mine("j", 17, 2, "r1", 0, "a", rank_part(tmp_path / "a4", "j", 17, 0, 2, taken=9000.0)[1])
    assert set(book.known("j", 17, 2, "r1")) == {0, 1}


def test_the_parts_kept_are_of_the_step_taken_last(tmp_path, rank_part) -> None:
    store = ReplicaStore(memory_bytes=1 << 30)
    for step, taken in ((7, 1000.0), (5, 2000.0)):  # (step 5 of a run resumed from step 4)
        _, sealed, _ = rank_part(tmp_path / "root", "j", step, 1, 2, taken=taken)
        pend = next((tmp_path / "root" / "j").glob(f".pending-{step:012d}-*")) / "rank-00001"
        store.begin("j", step, 1, 2, "r1", "n1", sealed.to_bytes())
        for f in sealed.files:
            store.write("j", step, 1, f["name"], 0, memoryview((pend / f["name"]).read_bytes()))
        store.end("j", step, 1)
    assert [r.step for r in store.held("j")] == [5]


def test_a_peer_says_it_has_the_steps_taken_last_not_the_highest(tmp_path) -> None:
    from snapd.daemon.peer_server import HAVE_STEPS, PeerServer
    from snapd.peers.keys import PeerKeys, create

    for step in range(10, 16):  # (an abandoned run's steps, kept)
        snapshot(tmp_path / "root", "solo", step, float(step), taken=1000.0 + step)
    snapshot(tmp_path / "root", "solo", 3, 3.0, taken=2000.0)  # (the run went back to step 2)
    create(tmp_path / "keys")
    server = PeerServer("tcp://127.0.0.1:*", "n0", PeerKeys.load(tmp_path / "keys"), tmp_path / "root",
                        ReplicaStore(0), lambda *a: None)
    try:
        have = server._have("solo")
    finally:
        server.close()
    assert len(have) == HAVE_STEPS and {e["step"] for e in have} == {3, 15, 14, 13}, have
    assert next(e for e in have if e["step"] == 3)["taken"] == 2000.0


def test_a_shared_file_is_taken_from_the_peers_copy_only_if_that_copy_is_of_this_making(tmp_path) -> None:
    """An incremental snapshot's file shared with step 1 is linked from the peer's copy of step 1
    only when the step 1 sent there is the one on this disk now (not a first making of it)."""
    from dataclasses import replace as with_

    from snapd.daemon.outgoing import Outgoing
    from snapd.daemon.peer_sender import Sender
    from snapd.peers.directory import PeerInfo

    class Link:  # (what the sender asks of the peer)
        def __init__(self) -> None:
            self.asked: list[dict] = []

        def request(self, header: dict, data: bytes | None = None) -> tuple[dict, None]:
            self.asked.append(header)
            return {"t": "ok"}, None

    one, m1 = snapshot(tmp_path / "root", "solo", 1, 1.0)
    two, m2 = snapshot(tmp_path / "root", "solo", 2, 2.0)
    f = dict(m2.files[0], shard=0, shared_from=f"{one.name}/{m1.files[0]['name']}")
    raw = with_(m2, files=[f, *m2.files[1:]]).to_bytes()
    o = Outgoing("solo", 2, 0, 1, "", two.parent, two, raw, 1, whole=True)
    for sent, linked in ((m1.checksum, 1), ("another making's", 0)):
        link = Link()
        s = Sender(PeerInfo("tcp://127.0.0.1:1", "n1"), link, "n0", lambda n: None)
        s.replicated[("solo", 0)], s._sent[("solo", 0)] = 1, sent
        assert len(s._link_shared(o, parse(raw))[1]) == linked
        assert [h["phase"] for h in link.asked] == ["link"] * linked
