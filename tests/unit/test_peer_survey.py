"""A restore's survey of the peers (issue 26). When it stops waiting: a node lost but still listed
(``--peers``, a peer directory's entry not yet stale) must not hold every rank's ``list()`` and
``restore()`` up for the peer timeout, and a peer yet to answer that may hold what completes a
newer step is still waited for, so that a restore never takes an older step for want of it. And
what it asks: each global manifest named, the one taken brought once."""

from __future__ import annotations


import pytest
import zmq

from snapd.daemon.job_survey import Survey
from snapd.daemon.survey_steps import Step, missing, settled
from snapd.daemon.peer_server import PeerServer
from snapd.daemon.whole_snapshots import Copy
from snapd.errors import InvalidArgument, SnapshotNotFound
from snapd.format.global_manifest import global_id, parse_any
from snapd.format.manifest import taken_of
from snapd.peers import wire
from snapd.peers.directory import PeerDirectory
from snapd.peers.keys import PeerKeys, create
from snapd.peers.replicas import ReplicaStore


def step(n: int, taken: float, world: int, held: tuple[int, ...]) -> Step:
    """Step ``n`` of ``world`` ranks, named by a peer, with the parts of ranks ``held`` somewhere."""
    return Step(n, {r: [(0, "tcp://a")] for r in held}, world_size=world, taken=taken, id="i",
                named_by=["tcp://a"])


def test_the_newest_step_anyone_named_with_every_part_somewhere_settles_a_survey() -> None:
    assert not settled({}, None)  # (nothing known yet: a peer not heard from may hold it all)
    assert settled({2: step(2, 20.0, 3, (0, 1, 2)), 1: step(1, 10.0, 3, (0,))}, None)
    # a newer step lacks rank 2's part: the peer yet to answer may hold it
    assert not settled({2: step(2, 20.0, 3, (0, 1)), 1: step(1, 10.0, 3, (0, 1, 2))}, None)
    # newest is taken last, not the highest step (a run resumed from step 1 took step 1 again)
    assert settled({1: step(1, 30.0, 2, (0, 1)), 2: step(2, 20.0, 2, (0,))}, None)
    assert not settled({1: step(1, 10.0, 2, (0, 1)), 2: step(2, 20.0, 2, (0,))}, None)
    # parts of a step whose global manifest nobody named: not one a restore can take
    assert settled({1: step(1, 10.0, 2, (0, 1)), 2: Step(2, sources={0: [(0, "tcp://a")]})}, None)
    # a step asked for: settled once each of its parts is somewhere, newer ones aside
    assert settled({1: step(1, 10.0, 2, (0, 1)), 2: step(2, 20.0, 2, (0,))}, 1)
    assert not settled({1: step(1, 10.0, 2, (0,))}, 1) and not settled({1: step(1, 10.0, 2, (0, 1))}, 3)
    # a single process's copies: the one taken last
    solo = {5: Step(5, whole=[Copy(1, "tcp://a", "c5", 200.0)]), 7: Step(7, whole=[Copy(0, "", "c7", 100.0)])}
    assert settled(solo, None) and settled(solo, 7) and not settled(solo, 6)
    # why none can be restored: the ranks whose parts no node holds, the first 16 of 100k named
    assert missing({9: step(9, 90.0, 100_000, (0,))}, None) == \
        f"step 9: rank(s) {list(range(1, 17))} and 99983 more's part(s) on no node that answered"


@pytest.mark.timeout(60)
def test_a_survey_stops_waiting_for_a_silent_peer_once_the_others_settle_it(tmp_path, curve_routers) -> None:
    """Real CurveZMQ sockets: one peer answers, one reads and never answers. With a timeout of
    300 s, the survey returns once the answer settles it (the test's own timeout is 60 s), names
    the silent peer, and without ``settled`` it waits for the silent peer as before."""
    create(tmp_path / "k")
    keys = PeerKeys.load(tmp_path / "k")
    servers = curve_routers([keys, keys], lambda i, h: None if i else {"t": "have", "steps": [{"step": 3}]})
    ctx = curve_routers.ctx
    eps = [ep for _, ep in servers]
    seen: list[str] = []
    got = wire.ask_all(ctx, keys, eps, {"t": "have", "job": "j"}, 300.0,
                       on_reply=lambda ep, reply: seen.append(ep), settled=lambda: bool(seen))
    assert seen == [eps[0]] and got[eps[0]]["steps"] == [{"step": 3}]
    assert isinstance(got[eps[1]], wire.PeerUnavailable), got
    assert eps[1] in str(got[eps[1]]) and "the others' answers settling it" in str(got[eps[1]])
    # not settled by what came: the silent peer is waited for, the whole timeout
    got = wire.ask_all(ctx, keys, eps, {"t": "have", "job": "j"}, 2.0, settled=lambda: False)
    assert "within 2 s (down" in str(got[eps[1]]), got


class _Before(PeerServer):
    """A daemon from before brief answers: ``brief`` unknown to it, ``global`` refused."""

    def _handle(self, h: dict, data):
        if h["t"] == "global":
            raise InvalidArgument(f"unknown request {h['t']!r}")
        return super()._handle({k: v for k, v in h.items() if k != "brief"}, data)


def test_a_survey_names_each_global_manifest_and_brings_only_the_one_taken(tmp_path, monkeypatch,
                                                                         committed_step) -> None:
    """A rank's survey asks every node what it holds of its job, and each node's 4 newest global
    manifests (MBs each for a large sharded model) came whole in every answer. Now they are named
    (world size, when taken, a hash), and the one a replacement node commits is brought from a node
    that named it, checked to be that making; from a daemon before this, through its full answer."""
    raw = committed_step(tmp_path / "n1")
    other = committed_step(tmp_path / "n2")  # (another making of step 3: other bytes)
    assert raw != other
    create(tmp_path / "keys")
    keys = PeerKeys.load(tmp_path / "keys")
    servers = [cls(f"tcp://127.0.0.1:{port}", node, keys, tmp_path / node, ReplicaStore(0), lambda *a: None)
               for cls, node, port in ((PeerServer, "n1", 0), (_Before, "n1", 0), (PeerServer, "n2", 0))]
    for s in servers:
        s.start()
    eps = [s.sock.getsockopt_string(zmq.LAST_ENDPOINT) for s in servers]
    ctx = zmq.Context()
    try:
        (brief,) = servers[0]._have("g", brief=True)
        m = parse_any(raw)
        assert brief["global"] is None and brief["parts"] == {"0": "disk", "1": "disk"}
        assert brief["named"] == {"world_size": 2, "taken": taken_of(m), "id": global_id(raw)}
        assert servers[0]._have("g")[0]["global"] == raw.decode()  # (asked as before: whole)
        with pytest.raises(InvalidArgument, match="step 4 is not committed here"):
            servers[0]._handle({"t": "global", "job": "g", "step": 4, "offset": 0, "length": 1 << 20}, None)
        survey = Survey(keys, PeerDirectory("tcp://127.0.0.1:1", "a", eps[:2]), tmp_path / "empty",
                        ReplicaStore(0), 5.0, ctx)
        (s,) = survey.survey("g").values()
        # (named by both: the one before sent it whole, kept if its answer came first)
        assert (s.world_size, s.id, sorted(s.named_by)) == (2, global_id(raw), sorted(eps[:2]))
        assert set(s.sources) == {0, 1}
        monkeypatch.setattr(wire, "PIECE_BYTES", 100)  # (brought in pieces: one of 4096 ranks is 85 MB)
        for first in (eps[0], eps[1]):  # (a daemon of now, and one from before)
            s.raw, s.named_by = None, [eps[2], first]  # (the first that named it has another making)
            assert survey.global_raw("g", s) == raw
        s.raw, s.named_by = None, [eps[2]]
        with pytest.raises(SnapshotNotFound, match="not the making of step 3 it named"):
            survey.global_raw("g", s)
    finally:
        for srv in servers:
            srv.stop()
        ctx.term()


class _Torn(PeerServer):
    """A node whose step 4 changed on its disk between naming it and being asked for it."""

    def _global(self, job: str, step: int, offset: int, length: int) -> tuple[dict, bytes]:
        return ({"t": "data", "size": 2}, b"{}") if step == 4 else super()._global(job, step, offset, length)


def test_a_newest_step_whose_global_manifest_no_node_gives_leaves_the_one_before(tmp_path,
                                                                               committed_step) -> None:
    """The newest complete step's global manifest, brought from the node that named it, is not the
    making it named: a restore of the newest takes the step before (logged), one of that step says so."""
    from snapd.daemon.part_fetch import PartFetch
    from snapd.format.jobdir import JobDir
    from snapd.format.retention import Retention

    committed_step(tmp_path / "n1", step=3)
    committed_step(tmp_path / "n1", step=4)
    create(tmp_path / "keys")
    keys = PeerKeys.load(tmp_path / "keys")
    server = _Torn("tcp://127.0.0.1:0", "n1", keys, tmp_path / "n1", ReplicaStore(0), lambda *a: None)
    server.start()
    ep = server.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    fetch = PartFetch(keys, PeerDirectory("tcp://127.0.0.1:1", "a", [ep]), tmp_path / "new", ReplicaStore(0),
                      5.0)
    job = JobDir(tmp_path / "new", "g")
    try:
        found = fetch.locate(job, "g", None, Retention())
        assert found == {"step": 3, "parts": {"0": [ep], "1": [ep]}}
        assert (tmp_path / "new" / "g" / "step-000000000003" / "manifest.json").exists()
        with pytest.raises(SnapshotNotFound, match="global manifest from no peer that named it"):
            fetch.locate(job, "g", 4, Retention())
    finally:
        server.stop()
