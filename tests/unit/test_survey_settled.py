"""When a restore's survey of the peers stops waiting (issue 26): a node lost but still listed
(``--peers``, a peer directory's entry not yet stale) must not hold every rank's ``list()`` and
``restore()`` up for the peer timeout, and a peer yet to answer that may hold what completes a
newer step is still waited for, so that a restore never takes an older step for want of it."""

from __future__ import annotations

import threading

import pytest
import zmq

from snapd.daemon.job_survey import Step, settled
from snapd.daemon.whole_snapshots import Copy
from snapd.format.global_manifest import GlobalManifest
from snapd.peers import wire
from snapd.peers.keys import PeerKeys, create


def step(n: int, taken: float, world: int, held: tuple[int, ...]) -> Step:
    m = GlobalManifest(step=n, job="g", world_size=world, created_unix_s=taken, parts=[], tensors={})
    return Step(n, m, b"", "tcp://a", {r: [(0, "tcp://a")] for r in held})


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


@pytest.mark.timeout(60)
def test_a_survey_stops_waiting_for_a_silent_peer_once_the_others_settle_it(tmp_path) -> None:
    """Real CurveZMQ sockets: one peer answers, one reads and never answers. With a timeout of
    300 s, the survey returns once the answer settles it (the test's own timeout is 60 s), names
    the silent peer, and without ``settled`` it waits for the silent peer as before."""
    create(tmp_path / "k")
    keys = PeerKeys.load(tmp_path / "k")
    ctx = zmq.Context()
    servers = []
    for _ in range(2):
        s = ctx.socket(zmq.ROUTER)
        s.curve_server, s.curve_secretkey, s.curve_publickey, s.linger = True, keys.secret, keys.public, 0
        servers.append((s, f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"))
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        for s, _ in servers:
            poller.register(s, zmq.POLLIN)
        while not stop.is_set():
            for s, _ in poller.poll(50):
                peer, *_ = s.recv_multipart()
                if s is servers[0][0]:
                    s.send_multipart([peer, *wire.encode({"t": "have", "steps": [{"step": 3}]})])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    eps = [ep for _, ep in servers]
    seen: list[str] = []
    try:
        got = wire.ask_all(ctx, keys, eps, {"t": "have", "job": "j"}, 300.0,
                           on_reply=lambda ep, reply: seen.append(ep), settled=lambda: bool(seen))
        assert seen == [eps[0]] and got[eps[0]]["steps"] == [{"step": 3}]
        assert isinstance(got[eps[1]], wire.PeerUnavailable), got
        assert eps[1] in str(got[eps[1]]) and "the others' answers settling it" in str(got[eps[1]])
        # not settled by what came: the silent peer is waited for, the whole timeout
        got = wire.ask_all(ctx, keys, eps, {"t": "have", "job": "j"}, 2.0, settled=lambda: False)
        assert "within 2 s (down" in str(got[eps[1]]), got
    finally:
        stop.set()
        t.join()
        for s, _ in servers:
            s.close()
        ctx.term()
