"""Peer replicas beside the remote tier (issue 26): nodes that meet in the bucket, a step the bucket
holds that no set of nodes still does, and a bucket that does not answer, or hangs, never holding up
a snapshot, a status, a daemon's start or a restore the nodes can serve."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from snapd.peers.directory import RELOAD_S
from snapd.peers.keys import create


def test_a_newer_step_the_bucket_holds_wins_its_missing_part_from_there(tmp_path, start, s3,
                                                                        peer_nodes) -> None:
    """Step 1 is replicated; step 2 is not (``replicas=0``) but reaches the bucket. Node 1 is lost:
    the nodes still hold step 1 whole, the bucket step 2; the resume takes step 2, rank 0's part
    from node 0's disk and rank 1's from the bucket."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/newer")
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"].get("g", {}).get("1") == [1],
                              timeout=30)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "2", "replicas=0", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "2"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["jobs"]["g"]["2"]["remote"] is True,
                              timeout=60)
    assert nodes.status(0)["peers"]["held"]["jobs"]["g"] == {"1": [1]}  # (no replica of step 2)
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "3", "restore", world=2)
    for r, o in enumerate(outs):
        assert o.split()[:4] == ["RESTORED", "2", str(200 + r), "2.0"], (o, nodes.logs())
    log = nodes.daemons[1].log_text()
    # each part from its fastest source: rank 0's from node 0's disk first, rank 1's from the bucket,
    # to node 1, or to node 0 first (rank 0's restore reads a tensor stored in rank 1's part) when
    # node 1's survey came after that: then from node 0's disk
    # (and where node 0 holds the step whole by then, the bucket is not a source of it at all)
    first = re.escape(f"resuming from step 2 (parts: {{0: ['{nodes.endpoints[0]}'")
    assert re.search(first + r"(, 'the remote tier')?\], 1: \[", log), log
    assert "rank 1's part (0 MiB) came from the remote tier" in nodes.daemons[0].log_text() + log, \
        nodes.logs()


def test_a_bucket_that_does_not_answer_leaves_the_peers_restore_alone(tmp_path, start, s3,
                                                                      peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/down")
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"].get("g", {}).get("1") == [1],
                              timeout=30)
    s3.stop()
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "2", "restore", world=2)
    for r, o in enumerate(outs):
        assert o.split()[:4] == ["RESTORED", "1", str(100 + r), "1.0"], (o, nodes.logs())
    assert "the remote tier does not answer for g" in nodes.daemons[1].log_text(), nodes.logs()


def test_a_bucket_that_hangs_holds_up_no_snapshot_status_start_or_restore(tmp_path, start, s3,
                                                                          peer_nodes) -> None:
    """Peers found through the bucket (its reads are the peer directory's thread's alone), parts
    uploaded to it (the upload thread's), and offered by it to a restore (waited for 20 s at most
    where the nodes hold the step whole)."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/hang")
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1"]] * 2, nodes.logs()
    assert s3.proc is not None
    os.kill(s3.proc.pid, signal.SIGSTOP)  # (it takes connections, and answers nothing for 60 s)
    try:
        time.sleep(RELOAD_S + 1)  # (the peer entries are due to be read again)
        for d in nodes.daemons:
            out = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", d.endpoint],
                                 capture_output=True, text=True, cwd="/", timeout=30)
            assert out.returncode == 0 and "peers:" in out.stdout, out
        outs = peer_nodes.ranks(nodes, "g", "run-1", "2", world=2)
        assert [o.split() for o in outs] == [["COMMITTED", "2"]] * 2, nodes.logs()
        nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"]["g"].get("2") == [1],
                                  timeout=30)
        nodes.lose(1)
        nodes.daemons[1] = nodes.start(1)  # (its start does not wait for the bucket)
        outs = peer_nodes.ranks(nodes, "g", "run-2", "3", "restore", world=2)
        for r, o in enumerate(outs):
            assert o.split()[:4] == ["RESTORED", "2", str(200 + r), "2.0"], (o, nodes.logs())
        assert "the remote tier does not answer for g within 20 s" in nodes.daemons[1].log_text()
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)


def test_daemons_find_each_other_through_the_remote_tier_or_a_shared_directory(tmp_path, start, s3,
                                                                               peer_nodes) -> None:
    create(tmp_path / "keys")
    eps = sorted(f"tcp://127.0.0.1:{p}" for p in peer_nodes.free_ports(2))
    # no --peers: node 0 and node 1 meet in the bucket they both upload to; node 1 also via a directory
    a = start("--peer-endpoint", eps[0], "--peer-keys", str(tmp_path / "keys"), "--node-name", "a",
              "--remote", f"{s3.url}/found", name="a", root=tmp_path / "a")
    b = start("--peer-endpoint", eps[1], "--peer-keys", str(tmp_path / "keys"), "--node-name", "b",
              "--remote", f"{s3.url}/found", "--peer-directory", str(tmp_path / "shared"), name="b",
              root=tmp_path / "b")
    assert json.loads((tmp_path / "shared" / "b.peer").read_text())["endpoint"] == eps[1]
    procs = [subprocess.Popen([sys.executable, str(peer_nodes.RANK), d.endpoint, "g", str(r), "2", "run-1",
                               "1"], stdout=subprocess.PIPE, text=True, cwd="/")
             for r, d in enumerate((a, b))]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert outs == ["COMMITTED 1\n"] * 2, (outs, a.log_text()[-2000:], b.log_text()[-2000:])
    # the step committed across the two disks from the parts they announced to each other (well
    # before commit_timeout_s: not in the bucket's own commit, which waits 2 s for a part to offer)
    assert "step 1 committed from the parts of 2 ranks (1 of them on this node)" in a.log_text()
    # status shows where the step is complete: each disk its rank, and the bucket once both parts are up
    def step_1() -> dict:
        out = subprocess.run([sys.executable, "-m", "snapd", "status", "--json", "--endpoint", a.endpoint],
                             capture_output=True, text=True, cwd="/")
        return json.loads(out.stdout)["peers"]["jobs"]["g"]["1"]
    a.wait_for(lambda: step_1()["remote"] is True, timeout=60)
    assert step_1()["disks"] == {"a": [0], "b": [1]}, step_1()
    text = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", a.endpoint],
                          capture_output=True, text=True, cwd="/").stdout
    assert re.search(r"job g step 1 \(complete on disks\): disks a: ranks 0; b: ranks 1; .*remote: committed",
                     text), text
