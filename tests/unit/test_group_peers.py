"""Peers learned from a job's own process group (issue 26; client/group_peers.py and
PeerDirectory.learn): what the ranks write in the group's store reaches their daemons, and what a
client tells its daemon is a peer of its job alone, bounded per user."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch.distributed as dist

from snapd import protocol
from snapd.client import group_peers
from snapd.client.group_peers import GroupPeers
from snapd.daemon.replication import Replication
from snapd.errors import DaemonUnavailable, InvalidArgument, LimitExceeded, ProtocolError
from snapd.peers import directory
from snapd.peers.directory import PeerDirectory, PeerInfo
from snapd.peers.keys import PeerKeys, create
from snapd.peers.wire import check_peer_address


class Told:
    """A daemon connection that records what a rank tells it (``fail``: raise that instead)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[list[str], bool]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def call(self, kind: str, **fields) -> dict:
        assert kind == "peers"
        with self.lock:
            self.calls.append(([p["endpoint"] for p in fields["peers"]], fields["complete"]))
        if self.fail is not None:
            raise self.fail
        return {"type": "peers_known"}


STARTED: list[GroupPeers] = []


def rank(store, r: int, world: int, endpoint: str | None, conn: Told, run: str = "run-1") -> GroupPeers:
    own = {"endpoint": endpoint, "node": f"n{r}"} if endpoint else None
    g = GroupPeers(store, "job", run, r, world, own, conn)
    g.start()
    STARTED.append(g)
    return g


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(group_peers, "POLL_S", 0.01)
    yield
    while STARTED:  # (a rank whose others never come would read the store for WAIT_S)
        STARTED.pop().stop()


def test_each_rank_tells_its_daemon_those_there_at_connect_then_every_ranks() -> None:
    store = dist.HashStore()
    a, b, c = Told(), Told(), Told()
    first = rank(store, 0, 3, "tcp://10.0.0.1:7010", a)
    assert a.calls == [(["tcp://10.0.0.1:7010"], False)] and not first.complete.is_set()
    rank(store, 1, 3, None, b)  # (a rank whose daemon has no peers: nothing to tell it; counted all the same)
    assert b.calls == []
    last = rank(store, 2, 3, "tcp://10.0.0.3:7010", c)
    both = ["tcp://10.0.0.1:7010", "tcp://10.0.0.3:7010"]
    assert c.calls == [(both, True)] and last.complete.is_set()  # (the last to connect: all at once)
    first.wait(5, "a test")
    assert first.complete.is_set() and a.calls[-1] == (both, True)


def test_a_rank_that_connects_twice_or_dies_before_its_entry_is_not_taken_for_another() -> None:
    store = dist.HashStore()
    a = Told()
    g = rank(store, 0, 3, "tcp://10.0.0.1:7010", a)
    rank(store, 0, 3, "tcp://10.0.0.1:7010", Told())  # rank 0 again (a client closed and made anew)
    store.add("job/run-1/n", 1)  # a rank counted itself and died before writing its entry
    store.set(f"job/run-1/e{store.add('job/run-1/n', 1)}", b"not json")  # and what is not an entry
    for bad in ({"rank": 7}, {"rank": -1}, {"rank": "1"}, [1]):  # nor a rank of this world
        store.set(f"job/run-1/e{store.add('job/run-1/n', 1)}", json.dumps(bad))
    rank(store, 1, 3, "tcp://10.0.0.2:7010", Told(), run="run-0")  # an earlier run's rank 1
    time.sleep(0.2)
    assert not g.complete.is_set(), a.calls  # ranks 1 and 2 of this run have not written theirs
    rank(store, 1, 3, "tcp://10.0.0.2:7010", Told())
    rank(store, 2, 3, "tcp://10.0.0.3:7010", Told())
    g.wait(5, "a test")
    assert a.calls[-1] == (["tcp://10.0.0.1:7010", "tcp://10.0.0.2:7010", "tcp://10.0.0.3:7010"], True)


def test_a_daemon_that_cannot_be_told_is_logged_and_told_again_after_a_restart(caplog) -> None:
    store = dist.HashStore()
    conn = Told(DaemonUnavailable("the daemon restarted"))
    g = rank(store, 0, 1, "tcp://10.0.0.1:7010", conn)
    assert g.complete.is_set() and "was not told the job's other daemons" in caplog.text
    conn.fail = None
    g.tell_again()  # (Client._rejoin: the new daemon knows nothing of what the old one was told)
    assert conn.calls == [(["tcp://10.0.0.1:7010"], True)] * 2


def test_waiting_for_ranks_that_never_connect_is_bounded_and_said(monkeypatch, caplog) -> None:
    monkeypatch.setattr(group_peers, "WAIT_S", 0.2)
    g = rank(dist.HashStore(), 0, 2, "tcp://10.0.0.1:7010", Told())
    g.wait(0.05, "restore()")
    assert "restore() goes on with 1 of 2 ranks' daemons known" in caplog.text
    waits: list = []
    with monkeypatch.context() as m:
        m.setattr(g.complete, "wait", waits.append)
        g.wait(5, "a snapshot")  # (once waited out, not again: each snapshot would wait)
    assert waits == [] and "a snapshot goes on" not in caplog.text
    g.complete.wait(5)
    assert "1 of 2 ranks wrote their daemon's endpoint" in caplog.text  # (the thread gave up)


def test_a_rank_that_never_connects_slows_the_others_reads_of_the_store(monkeypatch) -> None:
    """Past ``FAST_S`` without a new entry, each pass waits twice as long as the last, up to
    ``MAX_POLL_S``; a new entry brings back the quick reads (more ranks may be coming)."""
    monkeypatch.setattr(group_peers, "FAST_S", 0.0)
    monkeypatch.setattr(group_peers, "MAX_POLL_S", 0.08)
    store = dist.HashStore()
    g = GroupPeers(store, "job", "run-1", 0, 3, {"endpoint": "tcp://10.0.0.1:7010", "node": "n0"}, Told())

    class Passes:
        """The thread's waits between passes, taken at once; rank 1 connects after the sixth."""
        def __init__(self) -> None:
            self.waits: list[float] = []
            self.done = threading.Event()

        def wait(self, timeout: float) -> bool:
            self.waits.append(round(timeout, 3))
            if len(self.waits) == 6:
                rank(store, 1, 3, "tcp://10.0.0.2:7010", Told())
            if len(self.waits) == 10:
                self.done.set()
                return True
            return False
    g._stop = passes = Passes()  # type: ignore[assignment]
    g.start()
    assert passes.done.wait(5)
    assert passes.waits == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08, 0.01, 0.02, 0.04, 0.08], passes.waits


def test_a_jobs_peers_are_its_own_and_a_complete_telling_replaces_them() -> None:
    d = PeerDirectory("tcp://10.0.0.1:7010", "a", ("tcp://10.0.0.9:7010",))
    new = d.learn(1000, "u/j", [PeerInfo("tcp://10.0.0.2:7010", "b"), PeerInfo("tcp://10.0.0.1:7010", "a")],
                  complete=False)
    assert new == [PeerInfo("tcp://10.0.0.2:7010", "b")]  # (itself is no peer)
    assert [p.endpoint for p in d.all(job="u/j")] == ["tcp://10.0.0.2:7010", "tcp://10.0.0.9:7010"]
    assert [p.endpoint for p in d.all(job="u/other")] == ["tcp://10.0.0.9:7010"]
    assert [p.endpoint for p in d.all()] == ["tcp://10.0.0.9:7010"]
    assert d.replica_targets(1, "u/j") == [PeerInfo("tcp://10.0.0.2:7010", "b")]
    d.learn(1000, "u/j", [PeerInfo("tcp://10.0.0.3:7010", "c")], complete=False)  # (added)
    assert len(d.all(job="u/j")) == 3
    # the next run's ranks, all of them: the node that left the job (b) is no longer its peer
    assert d.learn(1000, "u/j", [PeerInfo("tcp://10.0.0.3:7010", "c"), PeerInfo("tcp://10.0.0.4:7010", "d")],
                   complete=True) == [PeerInfo("tcp://10.0.0.4:7010", "d")]
    assert [p.node for p in d.all(job="u/j")] == ["c", "d", "tcp://10.0.0.9:7010"]
    assert "tcp://10.0.0.2:7010" not in d.known() and "tcp://10.0.0.4:7010" in d.known()


def _bounded(monkeypatch, **bounds: int) -> tuple[PeerDirectory, list[PeerInfo]]:
    """A directory with ``bounds`` (``MAX_USER_PEERS=4``...) lowered, and ten endpoints to tell it."""
    for name, value in bounds.items():
        monkeypatch.setattr(directory, name, value)
    return PeerDirectory("tcp://10.0.0.1:7010", "a"), [PeerInfo(f"tcp://10.0.1.{i}:7010", f"n{i}")
                                                       for i in range(10)]


def test_what_one_user_tells_is_bounded_and_never_pushes_out_another_users_peers(monkeypatch) -> None:
    d, peers = _bounded(monkeypatch, MAX_USER_PEERS=4, MAX_USER_JOBS=2)
    d.learn(1, "victim", peers[:4], complete=True)
    d.learn(2, "x1", peers[4:6], complete=True)
    d.learn(2, "x2", peers[6:8], complete=True)
    d.learn(2, "x3", peers[8:9], complete=True)  # user 2's oldest job is forgotten (2 jobs at most)
    assert d.all(job="x1") == [] and len(d.all(job="x2")) == 2
    d.learn(2, "x4", peers[4:8], complete=True)  # 4 endpoints more: x2 and x3 go, never user 1's
    assert d.all(job="x2") == d.all(job="x3") == [] and len(d.all(job="x4")) == 4
    assert d.all(job="victim") == sorted(peers[:4])
    with pytest.raises(InvalidArgument, match="5 peers for job x4: at most 4"):
        d.learn(2, "x4", peers[:1], complete=False)
    assert len(d.all(job="x4")) == 4  # (refused: what it had stays)


def test_all_users_tellings_are_bounded_together_and_one_over_is_refused_not_another_forgotten(
        monkeypatch) -> None:
    d, peers = _bounded(monkeypatch, MAX_USER_PEERS=4, MAX_LEARNED_PEERS=6)
    d.learn(1, "a", peers[:4], complete=True)
    d.learn(2, "b", peers[4:6], complete=True)
    with pytest.raises(LimitExceeded, match="would have told it 7 peers: at most 6"):
        d.learn(3, "c", peers[6:7], complete=True)
    assert d.all(job="c") == [] and d.learned_jobs() == 2  # (nothing of it kept, nobody's forgotten)
    assert len(d.all(job="a")) == 4 and len(d.all(job="b")) == 2
    d.learn(3, "c", peers[:2], complete=True)  # endpoints already told by another job: no more of them
    with pytest.raises(LimitExceeded):
        d.learn(3, "c", peers[6:7], complete=False)
    assert d.all(job="c") == sorted(peers[:2])  # (refused: what it had stays)
    d.learn(1, "a", peers[:1], complete=True)  # a job's ranks tell fewer: room for others
    d.learn(3, "c", peers[6:8], complete=False)
    assert len(d.all(job="c")) == 4


@pytest.mark.parametrize("endpoint", ["tcp://*:7010", "tcp://0.0.0.0:7010", "tcp://[::]:7010",
                                      "tcp://10.0.0.1:0", "tcp://10.0.0.1:70000", "ipc:///tmp/x", 7010, None])
def test_a_peer_told_by_a_client_must_be_an_address_to_reach(endpoint) -> None:
    with pytest.raises(InvalidArgument, match="peer endpoint"):
        check_peer_address(endpoint)


@pytest.mark.parametrize("peers", ["tcp://10.0.0.1:7010", [{"endpoint": 7010}], [{"node": "a"}],
                                   [{"endpoint": "tcp://10.0.0.1:7010", "node": 3}],
                                   [{"endpoint": "tcp://10.0.0.1:7010"}] * 1025])
def test_a_peers_request_of_the_wrong_shape_is_refused_naming_it(peers) -> None:
    frame = protocol.message("peers", 7, peers=peers, complete=True)
    with pytest.raises(ProtocolError, match="peers") as e:
        protocol.decode_request(frame)
    assert e.value.code == "bad_field"


def test_threads_of_peers_no_job_has_end(tmp_path) -> None:
    create(tmp_path / "keys")
    d = PeerDirectory("tcp://127.0.0.1:1", "a")
    r = Replication(PeerKeys.load(tmp_path / "keys"), d, lambda n: None, 1.0)
    try:
        gone, kept = PeerInfo("tcp://127.0.0.1:2", "b"), PeerInfo("tcp://127.0.0.1:3", "c")
        d.learn(0, "j", [gone, kept], complete=True)
        for p in (gone, kept):
            r._sender(p)
        d.learn(0, "j", [kept], complete=True)
        r.reap(d.known())
        assert [s["endpoint"] for s in r.status()] == [kept.endpoint]
        assert not r._reaped[0].thread.join(5) and not r._reaped[0].thread.is_alive()
    finally:
        r.stop()


def test_entries_are_json_a_rank_at_a_time() -> None:
    store = dist.HashStore()
    rank(store, 3, 4, "tcp://10.0.0.1:7010", Told())
    assert json.loads(store.get("job/run-1/e1")) == {"endpoint": "tcp://10.0.0.1:7010", "node": "n3",
                                                     "rank": 3}
