"""Peers found through the job's own process group (issue 26): daemons given no list, no shared
directory and no bucket learn the job's other daemons from its ranks (client/group_peers.py), and
that is enough to commit across nodes, replicate, and resume a lost node from the replicas."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from snapd.client.connection import Connection
from snapd.errors import SnapdError

GROUP = Path(__file__).parent / "scripts" / "group_job.py"


def lines(out: str, word: str) -> dict[int, list[str]]:
    """Each rank's ``word`` lines of a torchrun job's output: rank -> the rest of each line."""
    found: dict[int, list[str]] = {}
    for rank, rest in re.findall(rf"^{word} (\d+) (.*)$", out, re.M):
        found.setdefault(int(rank), []).append(rest)
    return found


@pytest.mark.timeout(300)
def test_daemons_told_nothing_find_the_job_through_its_ranks_and_resume_a_lost_node(tmp_path, start, torchrun,
                                                                                    peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 3, listed=False)
    outsider = peer_nodes.peer_daemon(start, "--peer-keys", str(nodes.keys), "--node-name", "outsider",
                                      name="outsider", root=tmp_path / "outsider")
    eps = ",".join(d.endpoint for d in nodes.daemons)
    out = torchrun(GROUP, eps, "g", "1,2", nproc=3).stdout
    assert lines(out, "COMMITTED") == {r: ["1", "2"] for r in range(3)}, (out, nodes.logs())
    for i, d in enumerate(nodes.daemons):  # step 2 committed in each node's own root: announced to each other
        step = d.root / "g" / "step-000000000002"
        assert (step / "manifest.json").exists() and (step / f"rank-0000{i}").is_dir(), nodes.logs()
        assert learned(d.log_text()) == set(nodes.endpoints) - {nodes.endpoints[i]}, d.log_text()
    for i in range(3):  # and each part of step 2 reached its copy on the next node round the ring
        nodes.daemons[i].wait_for(lambda i=i: nodes.status(i)["peers"]["peers"] and all(
            p["backlog_parts"] == 0 for p in nodes.status(i)["peers"]["peers"]), timeout=30)
    held = {i: nodes.status(i)["peers"]["held"]["jobs"].get("g", {}).get("2", []) for i in range(3)}
    assert sorted(r for ranks in held.values() for r in ranks) == [0, 1, 2], (held, nodes.logs())
    status = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint",
                             nodes.daemons[0].endpoint], capture_output=True, text=True, cwd="/").stdout
    assert "1 job(s) told their nodes by their ranks" in status and "job g step 2" in status, status
    # a daemon of the cluster (same key) that is not one of the job's never heard of it
    assert "learned" not in outsider.log_text() and not (outsider.root / "g").exists()

    nodes.lose(2)
    nodes.daemons[2] = nodes.start(2)  # a replacement node: an empty disk, told nothing of the others
    # (its ranks connect before their process group is up: they look for each other at restore)
    out = torchrun(GROUP, ",".join(d.endpoint for d in nodes.daemons), "g", "3", "restore", "late",
                   nproc=3).stdout
    # every rank resumed step 2 with its own values: rank 2's part came from a replica on node 0
    assert lines(out, "RESTORED") == {r: [f"2 {200 + r} 2.0"] for r in range(3)}, (out, nodes.logs())
    assert lines(out, "COMMITTED") == {r: ["3"] for r in range(3)}, (out, nodes.logs())
    log = nodes.daemons[2].log_text()
    assert learned(log) == set(nodes.endpoints[:2]) and "step 2 adopted from" in log, log
    assert "rank 2's part (0 MiB) came from " + nodes.endpoints[held_by(held, 2)] in log, log
    for d in nodes.daemons:  # and step 3 committed across the three nodes again
        assert (d.root / "g" / "step-000000000003" / "manifest.json").exists(), nodes.logs()


def learned(log: str) -> set[str]:
    """The endpoints a daemon's log says it learned of job g from its ranks."""
    return set(re.findall(r"(tcp://[\d.:]+) \(node\d\)",
                          "".join(re.findall(r"g: \d+ peer\(s\) learned from its ranks: (.*)", log))))


def held_by(held: dict[int, list[int]], rank: int) -> int:
    return next(i for i, ranks in held.items() if rank in ranks)


def test_a_bad_peers_request_gets_a_clear_error_and_the_daemon_serves_on(tmp_path, start, peer_nodes,
                                                                           daemon) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 1, listed=False)
    conn = Connection(nodes.daemons[0].endpoint, 5.0)
    try:
        with pytest.raises(SnapdError, match="send hello before anything else"):
            conn.call("peers", peers=[], complete=True)
        conn.call("hello", job="h", pid=os.getpid(), on_busy="wait", rank=0, world_size=2)
        for peers, code, words in [
                ([{"endpoint": "tcp://*:7010"}], "invalid_argument", "peers[0]: peer endpoint 'tcp://*:7010'"),
                ([{"endpoint": "tcp://127.0.0.1:9"}, {"endpoint": "ipc:///x"}], "invalid_argument",
                 "peers[1]"),
                ([{"endpoint": "tcp://127.0.0.1:9"}] * 1025, "bad_field", "at most 1024 peers"),
                ("tcp://127.0.0.1:9", "bad_field", "must be a list")]:
            with pytest.raises(SnapdError, match=re.escape(words)) as e:
                conn.call("peers", peers=peers, complete=True)
            assert e.value.code == code
        # nothing of those was taken; a good one is, and the daemon serves on
        told = conn.call("peers", peers=[{"endpoint": "tcp://127.0.0.1:9", "node": "x"}], complete=True)
        assert told["peers"] == 1
        assert conn.call("status")["type"] == "status"
    finally:
        conn.close()
    plain = Connection(daemon.endpoint, 5.0)  # a daemon without peers says so
    try:
        plain.call("hello", job="h", pid=os.getpid(), on_busy="wait", rank=0, world_size=2)
        with pytest.raises(SnapdError, match="no peers") as e:
            plain.call("peers", peers=[{"endpoint": "tcp://127.0.0.1:9"}], complete=True)
        assert e.value.code == "no_peers"
    finally:
        plain.close()


def test_a_job_that_lists_its_peers_at_connect_has_them_and_a_bad_list_is_refused(tmp_path, start,
                                                                                  peer_nodes, daemon) -> None:
    import numpy as np

    import snapd.client as snapd
    from snapd.errors import InvalidArgument

    nodes = peer_nodes.Nodes(tmp_path, start, 2, listed=False)  # (daemons told nothing of each other)
    other = [nodes.endpoints[1]]
    state = {"w": np.arange(50_000, dtype=np.float32), "step": 4}
    with snapd.connect("solo", endpoint=nodes.daemons[0].endpoint, spawn=False, peers=other) as c:
        c.snapshot(state, step=4).wait(60)
    nodes.daemons[1].wait_for(lambda: nodes.status(1)["peers"]["held"]["jobs"].get("solo") == {"4": [0]},
                              timeout=30)
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("solo", endpoint=d.endpoint, spawn=False, peers=other) as c:
        assert [s.step for s in c.list()] == [4], d.log_text()
        back = c.restore()
    assert np.array_equal(back["w"], state["w"]) and back["step"] == 4
    with pytest.raises(InvalidArgument, match="peers must be a list"):
        snapd.connect("solo", endpoint=d.endpoint, spawn=False, peers="tcp://127.0.0.1:9")
    with pytest.raises(SnapdError, match=re.escape("peers[0]: peer endpoint 'tcp://*:9'")):
        snapd.connect("solo", endpoint=d.endpoint, spawn=False, peers=["tcp://*:9"])
    with pytest.raises(SnapdError, match="no peers") as e:  # (a daemon without peers cannot reach them)
        snapd.connect("solo", endpoint=daemon.endpoint, spawn=False, peers=other)
    assert e.value.code == "no_peers"
    with snapd.connect("solo", endpoint=d.endpoint, spawn=False) as c:  # (the refused ones left no session)
        assert [s.step for s in c.list()] == [4]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_job_that_tells_a_thousand_dead_peers_does_not_stop_the_daemon_serving_others(tmp_path, start,
                                                                                      peer_nodes) -> None:
    """The most one user's job may tell (1024 endpoints, none answering) takes a replication thread and
    a socket each, and a survey asks them all at once: past libzmq's 1023 sockets a context and the
    1024 open files systemd gives a service by default (the daemon is started under that limit)."""
    import numpy as np

    import snapd.client as snapd

    keys = tmp_path / "keys"
    peer_nodes.create(keys)
    d = peer_nodes.peer_daemon(start, "--peer-keys", str(keys), "--peer-timeout-s", "2",
                               command=["prlimit", "--nofile=1024:", sys.executable, "-m", "snapd"])
    dead = [f"tcp://127.0.0.1:{p}" for p in range(20000, 21024)]
    bad = snapd.connect("bad", endpoint=d.endpoint, spawn=False, rank=1, world_size=2, run_id="r", peers=dead)
    bad.snapshot({"x": np.arange(10.0)}, step=1)  # (its part announced to every one of them)
    bad.list()  # (and a survey of them all)
    with snapd.connect("good", endpoint=d.endpoint, spawn=False) as c:
        for step in range(3):
            c.snapshot({"w": np.full(100_000, step, np.float32)}, step=step).wait(60)
        assert float(c.restore()["w"][0]) == 2.0
    st = peer_nodes.Nodes.status_of(d.endpoint)["peers"]
    assert len(st["peers"]) == 1024 and st["learned_jobs"] == 1, d.log_text()[-3000:]
    assert "Too many open files" not in d.log_text()
    bad.close()
