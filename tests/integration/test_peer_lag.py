"""Peer replicas when replication lags or a holder fails (issue 26's degradation): a peer down
during snapshots delays only replication, the lag counts a part until its holder holds it whole, a
SIGTERM drain waits for the holders, a node lost before its part reached one gets a clear error,
a holder that restarted is sent its lost copies again, and a lost node still listed does not hold
up the survivors' restores. Daemons with separate roots on loopback
TCP stand for nodes (tests/integration/peer_nodes.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

import snapd.client as snapd
from snapd.errors import SnapshotNotFound
from snapd.report import status_text


def test_a_node_lost_before_its_part_reached_a_peer_gets_a_clear_error_not_an_empty_root(
        tmp_path, start, peer_nodes) -> None:
    """Replication lags (512 KiB/s) and node 2 is lost with its disk before its
    part reached its holder: no step has every part anywhere. The replacement node's README loop starts
    from scratch (``list()`` is empty); ``restore()`` says which rank's part is missing, not "no job
    under this root", and a surviving node's rank hears the same."""
    nodes = peer_nodes.Nodes(tmp_path, start, 3, "--peer-bytes-per-s", str(512 << 10))
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", "frozen")  # (8 MiB parts: ~16 s each on its way)
    assert all(o.split() == ["COMMITTED", "1"] for o in outs), (outs, nodes.logs())
    lag = [p["backlog_parts"] for p in nodes.status(2)["peers"]["peers"]]
    assert sorted(lag) == [0, 1], (lag, nodes.logs())  # (on its way to its holder: the node is lost now)
    nodes.lose(2)
    nodes.daemons[2] = nodes.start(2)
    for node, rank in ((2, 2), (0, 0)):
        with snapd.connect("g", endpoint=nodes.daemons[node].endpoint, spawn=False, rank=rank, world_size=3,
                           run_id="run-2", per_rank=["own"]) as c:
            if node == 2:
                assert c.list() == []
            with pytest.raises(SnapshotNotFound, match=r"no snapshot to restore on this node or its peers "
                                                       r"\(step 1: rank\(s\) \[2\]'s part\(s\) on no node"):
                c.restore()
            with pytest.raises(SnapshotNotFound, match=r"no step 7 to restore .*no node that answered knows"):
                c.restore(7)
    assert (nodes.daemons[0].root / "g" / "step-000000000001" / "rank-00000" / "manifest.json").exists()


def test_a_lost_node_still_listed_does_not_hold_up_the_survivors_restores(tmp_path, start,
                                                                         peer_nodes) -> None:
    """Node 2 is lost and replaced at another address; the survivors still list the lost one (their
    ``--peers``, as a peer directory's entry until it is stale). Each rank's ``list()`` and
    ``restore()`` asks every listed peer what it holds: once the answers show the newest step whole,
    the lost node is no longer waited for (each survey waited the whole peer timeout before), and
    every rank resumes bit-exact, the lost rank from its replica."""
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1,2")
    assert all(o.split() == ["COMMITTED", "1", "COMMITTED", "2"] for o in outs), (outs, nodes.logs())
    for i in range(3):  # (every part held by its replica holder before the node is lost)
        nodes.daemons[i].wait_for(lambda i=i: nodes.status(i)["peers"]["peers"] and all(
            p["backlog_parts"] == 0 for p in nodes.status(i)["peers"]["peers"]), timeout=30)
    nodes.lose(2)
    lost = nodes.endpoints[2]
    nodes.endpoints[2] = f"tcp://127.0.0.1:{peer_nodes.free_ports(1)[0]}"
    nodes.daemons[2] = nodes.start(2)  # (it lists the survivors and itself)
    for node in (0, 1, 2):
        with snapd.connect("g", endpoint=nodes.daemons[node].endpoint, spawn=False, rank=node, world_size=3,
                           run_id="run-2", per_rank=["own"]) as c:
            assert [s.step for s in c.list()] == ([1, 2] if node < 2 else [2]), nodes.logs()
            back = c.restore()
            assert (int(back["own"][0]), float(back["w"][0])) == (200 + node, 2.0), nodes.logs()
    for node in (0, 1):
        log = nodes.daemons[node].log_text()
        assert f"peer {lost} did not answer within" in log and "the others' answers settling it" in log, log


def test_a_peer_down_during_snapshots_delays_only_replication(tmp_path, start, peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    # the ring sends node 1's parts to node 2: node 2 stops answering (a hung or unreachable node)
    nodes.daemons[2].proc.send_signal(signal.SIGSTOP)
    try:  # the three steps commit while node 2 does not answer: they never wait for it
        outs = peer_nodes.ranks(nodes, "g", "run-1", "1,2,3", world=2)
        assert all(o.split() == ["COMMITTED", "1", "COMMITTED", "2", "COMMITTED", "3"] for o in outs), \
            (outs, nodes.logs())
        def lag() -> dict:
            return next(p for p in nodes.status(1)["peers"]["peers"] if p["endpoint"] == nodes.endpoints[2])

        nodes.daemons[1].wait_for(lambda: lag()["state"] == "down")  # (once its 2 s timeout passed)
        assert lag()["backlog_parts"] >= 1 and "did not answer" in lag()["last_error"], lag()
        assert "lag" in subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint",
                                        nodes.daemons[1].endpoint], capture_output=True, text=True).stdout
    finally:
        nodes.daemons[2].proc.send_signal(signal.SIGCONT)
    # once it answers, the newest step goes first, and the older ones are not sent at all
    nodes.daemons[1].wait_for(lambda: next(p for p in nodes.status(1)["peers"]["peers"]
                                           if p["endpoint"] == nodes.endpoints[2])["backlog_parts"] == 0,
                              timeout=90)
    held = nodes.status(2)["peers"]["held"]["jobs"]["g"]
    assert held == {"3": [1]}, held
    assert "holding g step 1 rank 1" not in nodes.daemons[2].log_text()


def test_sigterm_waits_for_the_parts_to_reach_their_replica_holders(tmp_path, start, peer_nodes) -> None:
    # replication bound to 4 KiB/s: rank 1's part (16 KiB) takes about 4 s to reach node 0
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--peer-bytes-per-s", "4096")
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", world=2)
    assert all(o.split() == ["COMMITTED", "1"] for o in outs), (outs, nodes.logs())
    assert nodes.daemons[1].stop(signal.SIGTERM) == 0  # (the node is being drained: it is going away)
    assert "g step 1 rank 1 replicated to" in nodes.daemons[1].log_text(), nodes.logs()
    assert nodes.status(0)["peers"]["held"]["jobs"]["g"] == {"1": [1]}


def test_a_peers_lag_counts_the_part_being_sent_until_the_peer_holds_it(tmp_path, start, peer_nodes) -> None:
    """Lag 0 in ``snapd status`` means the peer holds every part made here: what an operator (or a
    drain script) checks before taking a node away. The part in flight is lag too."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--peer-bytes-per-s", str(1 << 20))
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", "frozen", world=2)  # (8 MiB parts: ~8 s each)
    assert all(o.split() == ["COMMITTED", "1"] for o in outs), (outs, nodes.logs())
    seen, shown = set(), ""
    while True:
        st = nodes.status(1)
        (peer,) = st["peers"]["peers"]
        seen.add(peer["sending"])
        if peer["sending"] and not shown:
            shown = status_text(st)  # (what ``snapd status`` prints)
        if peer["backlog_parts"] == 0:
            break
        assert peer["oldest_s"] < 60, (peer, nodes.logs())
    assert nodes.status(0)["peers"]["held"]["jobs"].get("g") == {"1": [1]}, nodes.logs()
    assert "g step 1 rank 1" in seen and peer["sending"] is None, seen
    assert "lag 1 part(s)" in shown and "sending g step 1 rank 1)" in shown, shown


def test_a_replica_holder_that_restarted_is_sent_its_lost_copies_again(tmp_path, start, peer_nodes) -> None:
    """A rolling upgrade: node 1's daemon restarts and the copy of rank 0's part it held in memory
    is gone; node 0 asks, finds it missing, and sends it again. Then node 0's daemon restarts, and
    node 1's again: node 0's new run knows from its record what node 1 held, and sends it again too.
    Node 0 is then lost with its disk, and its rank resumes bit-exact from that copy. Before, the
    sender counted the copy as held until the next step, and the step could not be resumed."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--peer-check-s", "0.5", "--metrics-addr", "127.0.0.1:0")
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", world=2)
    assert all(o.split() == ["COMMITTED", "1"] for o in outs), (outs, nodes.logs())

    def held(i: int) -> dict:
        return nodes.status(i)["peers"]["held"]["jobs"].get("g", {})

    def restart(i: int) -> None:
        assert nodes.daemons[i].stop(signal.SIGTERM) == 0
        nodes.daemons[i] = nodes.start(i)  # (its root stays: its own part of step 1 is on its disk)
    nodes.daemons[1].wait_for(lambda: held(1) == {"1": [0]} and held(0) == {"1": [1]}, timeout=30)
    restart(1)
    nodes.daemons[1].wait_for(lambda: held(1) == {"1": [0]}, timeout=30)
    time.sleep(2)  # (4 more checks: a holder that keeps its copy is asked, not sent it again)
    st = nodes.status(0)
    (to_1,) = st["peers"]["peers"]
    # (sent again once; a check that reached node 1 as it restarted may count as a failure: its request
    # died with the old daemon, a 2 s timeout under load; CI saw it once)
    assert to_1["resent_parts"] == 1 and re.search(r"failures \d+, sent again 1\b", status_text(st)), to_1
    scraped = urllib.request.urlopen(st["metrics"], timeout=10).read().decode()
    assert f'snapd_peer_resent_parts_total{{peer="{nodes.endpoints[1]}"}} 1.0' in scraped, scraped
    assert "no longer holds g step 1 rank 0" in nodes.daemons[0].log_text(), nodes.logs()
    restart(0)
    nodes.daemons[0].wait_for(lambda: "1 part(s) this daemon's last run sent 1 holder(s)" in
                              nodes.daemons[0].log_text(), timeout=30)
    restart(1)
    nodes.daemons[1].wait_for(lambda: held(1) == {"1": [0]}, timeout=30)
    (to_1,) = nodes.status(0)["peers"]["peers"]
    assert to_1["resent_parts"] == 1 and to_1["replicated_bytes"] > 0, to_1
    nodes.lose(0)
    nodes.daemons[0] = nodes.start(0)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "2", "restore", world=2)
    for r, o in enumerate(outs):
        assert o.split()[:4] == ["RESTORED", "1", str(100 + r), "1.0"], (o, nodes.logs())
