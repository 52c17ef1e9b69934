"""The pieces of peer replication on their own: the cluster key, the replica store's bounds and
what it keeps, the ring, the part book and the commit it makes on a node that has only its own
parts (issue 26)."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from snapd.errors import InvalidArgument
from snapd.format import step_outcome
from snapd.format.global_manifest import parse_any, part_dir
from snapd.format.jobdir import JobDir
from snapd.format.manifest import MANIFEST_NAME, parse
from snapd.format.retention import Retention
from snapd.format.spread_commit import adopt, commit_known
from snapd.peers.directory import PeerDirectory, PeerInfo
from snapd.peers.keys import PeerKeys, create
from snapd.peers.replicas import NoRoom, ReplicaStore
from snapd.peers.wire import check_job_path


def test_a_cluster_key_is_made_private_and_loads(tmp_path) -> None:
    secret, public = create(tmp_path / "k")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    keys = PeerKeys.load(tmp_path / "k")
    assert len(keys.public) == 40 and keys.public in keys.allowed
    with pytest.raises(InvalidArgument, match="exists: not replacing"):
        create(tmp_path / "k")
    os.chmod(secret, 0o640)
    with pytest.raises(InvalidArgument, match="mode 640"):
        PeerKeys.load(tmp_path / "k")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path / "k", 0o777)
    with pytest.raises(InvalidArgument, match="could change it"):
        PeerKeys.load(tmp_path / "k")
    with pytest.raises(InvalidArgument, match="no such directory"):
        PeerKeys.load(tmp_path / "none")


@pytest.mark.parametrize("job", ["../x", "a/b/c", "/abs", "", "a/..", ".hidden", "a\0b"])
def test_a_job_path_from_a_peer_never_leaves_the_root(job) -> None:
    with pytest.raises(InvalidArgument):
        check_job_path(job)
    assert check_job_path("alice/run-1") == "alice/run-1"


def test_the_ring_sends_each_part_to_the_next_nodes() -> None:
    eps = [f"tcp://10.0.0.{i}:7010" for i in range(1, 5)]
    d = PeerDirectory(eps[3], "n4", tuple(eps))
    assert [p.endpoint for p in d.all()] == eps[:3]
    assert [p.endpoint for p in d.replica_targets(2)] == eps[:2]  # (round the ring from the last)
    assert [p.endpoint for p in PeerDirectory(eps[1], "n2", tuple(eps)).replica_targets(1)] == [eps[2]]
    assert len(d.replica_targets(10)) == 3


def test_peers_found_in_a_directory(tmp_path) -> None:
    a = PeerDirectory("tcp://10.0.0.1:7010", "a", (), tmp_path)
    b = PeerDirectory("tcp://10.0.0.2:7010", "b", (), tmp_path)
    a.publish()
    b.publish()
    assert a.all() == []  # (read on the directory's thread, or a pass: whoever asks never waits on it)
    (tmp_path / "junk.peer").write_text("{not json")
    (tmp_path / "gone.peer").write_text(json.dumps({"endpoint": "tcp://10.0.0.9:7010", "node": "gone",
                                                    "at": time.time() - 3600}))  # (not rewritten for an hour)
    a.refresh()
    b.refresh()
    assert a.all() == [PeerInfo("tcp://10.0.0.2:7010", "b")]
    assert b.replica_targets(1) == [PeerInfo("tcp://10.0.0.1:7010", "a")]
    # b restarts on another port: its rewritten entry is read anew; an entry removed is a peer gone
    PeerDirectory("tcp://10.0.0.2:7011", "b", (), tmp_path).publish()
    c = PeerDirectory("tcp://10.0.0.3:7010", "c", (), tmp_path)
    c.publish()
    a.refresh()
    assert a.all() == [PeerInfo("tcp://10.0.0.2:7011", "b"), PeerInfo("tcp://10.0.0.3:7010", "c")]
    (tmp_path / "c.peer").unlink()
    # what another user could plant there: an entry of 1 GiB, a FIFO; neither is read, nor hangs it
    with open(tmp_path / "huge.peer", "wb") as f:
        f.truncate(1 << 30)
    os.mkfifo(tmp_path / "fifo.peer")
    a.refresh()
    assert a.all() == [PeerInfo("tcp://10.0.0.2:7011", "b")]


def test_the_directory_is_read_and_written_on_its_own_thread(tmp_path) -> None:
    a = PeerDirectory("tcp://10.0.0.1:7010", "a", (), tmp_path)
    PeerDirectory("tcp://10.0.0.2:7010", "b", (), tmp_path).publish()
    a.start()
    try:
        assert a.all(wait_s=10) == [PeerInfo("tcp://10.0.0.2:7010", "b")]
        assert json.loads((tmp_path / "a.peer").read_text())["endpoint"] == "tcp://10.0.0.1:7010"
    finally:
        a.stop()
    with pytest.raises(InvalidArgument, match="cannot write this daemon's endpoint"):
        PeerDirectory("tcp://10.0.0.1:7010", "a", (), tmp_path / "a.peer" / "x").start()


def test_the_replica_store_holds_what_the_manifest_says_within_its_budget(tmp_path, rank_part) -> None:
    root = tmp_path / "root"
    _, sealed, _ = rank_part(root, "j", 1, 1, 2)
    raw = sealed.to_bytes()
    store = ReplicaStore(memory_bytes=len(raw) + sum(f["bytes"] for f in sealed.files) + 100)  # (one part)
    store.begin("j", 1, 1, 2, "r1", "n1", raw)
    name = sealed.files[0]["name"]
    with pytest.raises(InvalidArgument, match="not a range of a file"):
        store.write("j", 1, 1, name, sealed.files[0]["bytes"] - 1, memoryview(b"xx"))
    with pytest.raises(InvalidArgument, match="not a range of a file"):
        store.write("j", 1, 1, "../../etc/passwd", 0, memoryview(b"x"))
    with pytest.raises(InvalidArgument, match="ended with 0 of"):
        store.end("j", 1, 1)
    pend = next((root / "j").glob(".pending-*")) / part_dir(1)
    body = (pend / name).read_bytes()
    store.write("j", 1, 1, name, 0, memoryview(body))
    assert store.get("j", 1, 1) is None  # (not ended: never served)
    store.end("j", 1, 1)
    r = store.get("j", 1, 1)
    assert r is not None and store.read(r, name, 0, len(body)) == body
    with pytest.raises(InvalidArgument, match="another part"):
        store.begin("j", 2, 1, 2, "r1", "n1", raw)  # (the manifest says step 1)
    with pytest.raises(NoRoom, match="no replica_dir"):
        store.begin("j", 1, 0, 2, "r1", "n1", rank_part(root, "j", 1, 0, 2)[1].to_bytes())


def test_an_older_step_stays_until_a_newer_one_is_committed(tmp_path, rank_part) -> None:
    root = tmp_path / "root"
    committed: set[int] = set()
    store = ReplicaStore(memory_bytes=1 << 30, directory=tmp_path / "replicas",
                         committed=lambda job, step: step in committed)
    for step in (1, 2):
        _, sealed, _ = rank_part(root, "j", step, 1, 2)
        pend = next((root / "j").glob(f".pending-{step:012d}-*")) / part_dir(1)
        store.begin("j", step, 1, 2, "r1", "n1", sealed.to_bytes())
        for f in sealed.files:
            store.write("j", step, 1, f["name"], 0, memoryview((pend / f["name"]).read_bytes()))
        store.end("j", step, 1)
        committed.add(1)
    # step 2 never committed (another rank never finished it): step 1 is still the resume point
    assert sorted(r.step for r in store.held("j")) == [1, 2]
    committed.add(2)
    store.prune("j")
    assert [r.step for r in store.held("j")] == [2]
    # and on disk too, when memory is full; a daemon started again takes them up
    small = ReplicaStore(memory_bytes=0, directory=tmp_path / "replicas2")
    _, sealed, _ = rank_part(root, "k", 5, 0, 2)
    small.begin("k", 5, 0, 2, "r1", "n0", sealed.to_bytes())
    pend = next((root / "k").glob(".pending-*")) / part_dir(0)
    for f in sealed.files:
        small.write("k", 5, 0, f["name"], 0, memoryview((pend / f["name"]).read_bytes()))
    small.end("k", 5, 0)
    assert small.get("k", 5, 0).where == "disk"
    again = ReplicaStore(memory_bytes=0, directory=tmp_path / "replicas2")
    again.load_disk()
    assert again.get("k", 5, 0) is not None and again.get("k", 5, 0).checksum == sealed.checksum


def test_a_node_commits_from_its_own_part_and_the_others_announced(tmp_path, rank_part) -> None:
    # two nodes, two roots: each has its own rank's part and learns the other's manifest
    a, b = tmp_path / "a", tmp_path / "b"
    ja, sa, da = rank_part(a, "j", 3, 0, 2)
    jb, sb, db = rank_part(b, "j", 3, 1, 2)
    assert da.committed is None and db.committed is None
    assert not commit_known(da, {}, Retention())  # (rank 1 neither here nor known)
    assert commit_known(da, {1: parse(sb.to_bytes())}, Retention())
    assert commit_known(db, {0: parse(sa.to_bytes())}, Retention())
    ga = parse_any((a / "j" / "step-000000000003" / MANIFEST_NAME).read_bytes())
    gb = parse_any((b / "j" / "step-000000000003" / MANIFEST_NAME).read_bytes())
    assert [p["checksum"] for p in ga.parts] == [p["checksum"] for p in gb.parts] == \
        [sa.checksum, sb.checksum]
    assert (a / "j" / "step-000000000003" / part_dir(0)).is_dir()
    assert not (a / "j" / "step-000000000003" / part_dir(1)).exists()  # (on the other node)
    # a replacement node adopts the global manifest; a part claimed twice gives the step up
    c = tmp_path / "c"
    adopt(JobDir(c, "j"), (a / "j" / "step-000000000003" / MANIFEST_NAME).read_bytes(), Retention(), "peer a")
    assert (c / "j" / "step-000000000003" / MANIFEST_NAME).exists()
    _, s4, d4 = rank_part(a, "j", 4, 0, 2)
    other = rank_part(tmp_path / "x", "j", 4, 0, 2, value=9.0)[1]
    assert not commit_known(d4, {0: parse(other.to_bytes()), 1: parse(sb.to_bytes())}, Retention())
    given_up = step_outcome.outcome(d4, count=False)  # (at once: the rank's own part waits no timeout)
    assert given_up.state == "failed" and "two processes claim one rank" in given_up.detail, given_up


def test_a_file_taken_from_an_older_replica_is_never_written_again(tmp_path, rank_part) -> None:
    """``link``: an incremental part's file shared with the step before is taken from that step's
    replica here, only whole, only of the same size, only once, and no piece may then change it."""
    root = tmp_path / "root"
    store = ReplicaStore(memory_bytes=1 << 30)
    _, one, _ = rank_part(root, "j", 1, 1, 2)
    pend = next((root / "j").glob(".pending-000000000001-*")) / part_dir(1)
    name = one.files[0]["name"]
    body = (pend / name).read_bytes()
    store.begin("j", 1, 1, 2, "r1", "n1", one.to_bytes())
    store.write("j", 1, 1, name, 0, memoryview(body))
    store.begin("j", 2, 1, 2, "r1", "n1", rank_part(root, "j", 2, 1, 2)[1].to_bytes())
    with pytest.raises(InvalidArgument, match="no replica of step 1"):  # (not ended: not to be used)
        store.link("j", 2, 1, name, 1, name)
    store.end("j", 1, 1)
    _, three, _ = rank_part(root, "j", 3, 1, 2, n=999)  # (its file is of another size)
    store.begin("j", 3, 1, 2, "r1", "n1", three.to_bytes())
    with pytest.raises(InvalidArgument, match="no replica of step 1 with a"):
        store.link("j", 3, 1, three.files[0]["name"], 1, name)
    store.link("j", 2, 1, name, 1, name)
    with pytest.raises(InvalidArgument, match="no file"):
        store.link("j", 2, 1, name, 1, name)  # (once)
    with pytest.raises(InvalidArgument, match="it may write"):
        store.write("j", 2, 1, name, 0, memoryview(b"x"))
    with pytest.raises(InvalidArgument, match="no replica of step 7"):
        store.link("j", 3, 1, three.files[0]["name"], 7, name)
    store.end("j", 2, 1)
    r = store.get("j", 2, 1)
    assert r is not None and store.read(r, name, 0, len(body)) == body


def test_a_survey_asks_every_peer_at_once_and_names_those_that_do_not_answer(tmp_path, curve_routers) -> None:
    """Real CurveZMQ sockets: a peer that answers, one that answers an error, one that never
    answers, one with another cluster's key (its handshake fails: no answer), one not there."""
    from snapd.peers import wire
    from snapd.peers.wire import PeerRefused, PeerUnavailable

    create(tmp_path / "k")
    keys = PeerKeys.load(tmp_path / "k")
    create(tmp_path / "other")
    other = PeerKeys.load(tmp_path / "other")
    answers = [lambda h: {"t": "have", "steps": [{"step": 3}], "asked": h},
               lambda h: {"t": "error", "message": "no such job"}, lambda h: None, lambda h: None]
    # (the third reads and never answers; the fourth's handshake fails)
    servers = curve_routers([keys, keys, keys, other], lambda i, h: answers[i](h))
    gone = "tcp://127.0.0.1:1"
    eps = [ep for _, ep in servers] + [gone]
    fds = len(os.listdir("/proc/self/fd"))
    t0 = time.monotonic()
    got = wire.ask_all(curve_routers.ctx, keys, eps, {"t": "have", "job": "j"}, 2.0)
    took = time.monotonic() - t0
    assert got[eps[0]]["steps"] == [{"step": 3}] and got[eps[0]]["asked"]["job"] == "j"
    assert isinstance(got[eps[1]], PeerRefused) and "no such job" in str(got[eps[1]])
    for ep in eps[2:]:
        assert isinstance(got[ep], PeerUnavailable) and ep in str(got[ep])
    assert took < 5.0  # (one deadline for all: one a silent peer would be 6 s)
    deadline = time.monotonic() + 5  # (its sockets are closed: ZeroMQ's reaper thread lets the fds go)
    while len(os.listdir("/proc/self/fd")) > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= fds
