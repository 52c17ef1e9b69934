"""Peer replicas (issue 26): daemons with separate roots on loopback TCP stand for nodes that share
no filesystem. A job's global snapshot commits across them, every part has a copy on another node,
and a node lost with its disk comes back from its peers, with no remote tier."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zmq

import snapd.client as snapd
from snapd.errors import SnapshotNotFound
from snapd.format.manifest import parse
from snapd.peers.keys import PeerKeys, create

FSDP2 = Path(__file__).parent / "scripts" / "fsdp2_job.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_node_of_an_fsdp2_job_resumes_bit_exact_from_its_peers_replicas(tmp_path, start, torchrun,
                                                                               peer_nodes):
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    eps = ",".join(d.endpoint for d in nodes.daemons)
    dcp_dir = str(tmp_path / "dcp")
    saved = torchrun(FSDP2, "save", str(tmp_path / "unused"), "fsdp", dcp_dir, eps, nproc=3).stdout
    assert sorted(re.findall(r"SAVED (\d)", saved)) == ["0", "1", "2"], saved
    for i, d in enumerate(nodes.daemons):  # each node committed step 3 in its own root, with its rank's part
        step = d.root / "fsdp" / "step-000000000003"
        assert (step / "manifest.json").exists() and (step / f"rank-0000{i}").is_dir(), nodes.logs()
        assert not (step / f"rank-0000{(i + 1) % 3}").exists()
    for i in range(3):  # every part has its copy in another node's memory before the node is lost
        nodes.daemons[i].wait_for(lambda i=i: nodes.status(i)["peers"]["peers"] and all(
            p["backlog_parts"] == 0 for p in nodes.status(i)["peers"]["peers"]), timeout=30)
    held = {r for i in range(3)
            for r in nodes.status(i)["peers"]["held"]["jobs"].get("fsdp", {}).get("3", [])}
    assert held == {0, 1, 2}, nodes.logs()
    nodes.lose(2)
    nodes.daemons[2] = nodes.start(2)  # the replacement node: an empty disk, the same peers
    eps = ",".join(d.endpoint for d in nodes.daemons)
    resumed = torchrun(FSDP2, "resume", str(tmp_path / "unused"), "fsdp", dcp_dir, eps, nproc=3).stdout
    # every rank's shards equal DCP's own load of the same state, bit for bit; RNG back to its rank
    assert sorted(re.findall(r"RESUMED (\d)", resumed)) == ["0", "1", "2"], resumed
    assert sorted(re.findall(r"RNG (\d \w+)", saved)) == sorted(re.findall(r"RNG-RESTORED (\d \w+)", resumed))
    log = nodes.daemons[2].log_text()
    assert "step 3 adopted from" in log and "rank 2's part" in log, log
    # and the resumed run's step 4 committed across the three nodes again
    for d in nodes.daemons:
        assert (d.root / "fsdp" / "step-000000000004" / "manifest.json").exists(), nodes.logs()


def test_parts_commit_across_nodes_and_a_lost_node_restores_from_replicas(tmp_path, start,
                                                                          peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1,2")
    assert all(o.split() == ["COMMITTED", "1", "COMMITTED", "2"] for o in outs), (outs, nodes.logs())
    st = nodes.status(0)["peers"]
    assert st["jobs"]["g"]["2"]["complete_on_disks"], st
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["peers"][0]["replicated_bytes"] > 0)
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    # the replacement node's client sees the step to resume from, as the README's loop asks it
    with snapd.connect("g", endpoint=nodes.daemons[1].endpoint, spawn=False, rank=1, world_size=3,
                       run_id="run-2", per_rank=["own"]) as c:
        assert [s.step for s in c.list()] == [2], nodes.logs()
    outs = peer_nodes.ranks(nodes, "g", "run-2", "3", "restore")
    for r, o in enumerate(outs):
        assert o.split()[:4] == ["RESTORED", "2", str(200 + r), "2.0"], (o, nodes.logs())
        assert "COMMITTED 3" in o
    # a process with no daemon is told where the part it lacks is (step 3's rank 0 is on node 0 only)
    with pytest.raises(SnapshotNotFound, match="on another node"):
        snapd.load(nodes.daemons[2].root, "g", 3, rank=0)
    # and `snapd verify` there checks the parts it has and names those it cannot
    out = subprocess.run([sys.executable, "-m", "snapd", "verify", str(nodes.daemons[2].root / "g" /
                                                                      "step-000000000003")],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 1 and "rank 0: " in out.stdout and "is on another node" in out.stdout, out


def test_a_damaged_replica_is_caught_and_another_copy_used(tmp_path, start, peer_nodes) -> None:
    # two replicas of each part, kept on disk (no memory for them), so this test can damage one
    nodes = peer_nodes.Nodes(tmp_path, start, 3, "--replicas", "2", "--replica-memory-bytes", "0",
                             replica_dirs=True)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1")
    assert all(o.split() == ["COMMITTED", "1"] for o in outs), (outs, nodes.logs())
    for i in (0, 1):
        part = tmp_path / f"replicas{i}" / "g" / "step-000000000001" / "rank-00002"
        nodes.daemons[i].wait_for(lambda part=part: (part / "manifest.json").exists(), timeout=30)
    # node 0's copy of rank 2's part gets a flipped byte inside a chunk; node 2 is then lost
    first = tmp_path / "replicas0" / "g" / "step-000000000001" / "rank-00002"
    m = parse((first / "manifest.json").read_bytes())
    c = next(t for t in m.tensors if t.chunks).chunks[0]
    data = first / m.files[c.file]["name"]
    raw = bytearray(data.read_bytes())
    raw[c.offset] ^= 0xFF
    data.write_bytes(raw)
    nodes.lose(2)
    nodes.daemons[2] = nodes.start(2)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "2", "restore")
    assert [o.split()[:4] for o in outs] == [["RESTORED", "1", str(100 + r), "1.0"] for r in range(3)], \
        (outs, nodes.logs())
    log = nodes.daemons[2].log_text()
    assert re.search(r"rank 2's part from tcp://127.0.0.1:\d+ unusable \(.*checksum", log), log
    assert "rank 2's part (0 MiB) came from " + nodes.endpoints[1] in log, log
    assert log.count("rank 2's part (0 MiB) came from ") == 1, log  # (its prefetch and restore: one fetch)


def test_a_replacement_node_brings_a_ranks_part_when_the_rank_connects(tmp_path, start, peer_nodes) -> None:
    """The trainer's startup and the part's transfer overlap: the part is here before ``restore``."""
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1,2")
    assert all(o.split() == ["COMMITTED", "1", "COMMITTED", "2"] for o in outs), (outs, nodes.logs())
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["peers"][0]["backlog_parts"] == 0, timeout=30)
    nodes.lose(1)
    nodes.daemons[1] = d = nodes.start(1)
    step = d.root / "g" / "step-000000000002"
    with snapd.connect("g", endpoint=d.endpoint, spawn=False, rank=1, world_size=3, run_id="run-2",
                       per_rank=["own"]) as c:
        d.wait_for(lambda: (step / "rank-00001" / "manifest.json").exists(), timeout=30)  # (no restore asked)
        assert nodes.status(1)["peers"]["prefetched_parts"] == 1
        back = c.restore("latest")
        assert (back["step"], int(back["own"][0]), float(back["w"][0])) == (2, 201, 2.0)
    log = d.log_text()
    assert re.search(r"step 2: rank 1's part prefetched at its hello, from tcp://127.0.0.1:\d+ in", log), log
    assert log.count("rank 1's part (0 MiB) came from ") == 1, log  # (the restore found it here)
    # a job resumed on another world size reshards: its ranks' hellos bring nothing of the old layout
    had = (step / "rank-00000").exists()  # (as rank 1's restore left it: it reads what it needs)
    with snapd.connect("g", endpoint=d.endpoint, spawn=False, rank=0, world_size=2, run_id="run-3",
                       per_rank=["own"]):
        d.wait_for(lambda: "step 2 was saved on 3 ranks, not 2" in d.log_text(), timeout=30)
    assert (step / "rank-00000").exists() == had and nodes.status(1)["peers"]["prefetched_parts"] == 1
    # a rank whose part is on its node's disk (a daemon restarted, not a node lost) brings nothing
    with snapd.connect("g", endpoint=nodes.daemons[0].endpoint, spawn=False, rank=0, world_size=3,
                       run_id="run-4", per_rank=["own"]) as c:
        assert c.restore("latest")["step"] == 2
    assert nodes.status(0)["peers"]["prefetched_parts"] == 0
    assert "prefetched" not in nodes.daemons[0].log_text()


def test_a_step_of_a_job_across_nodes_is_not_removed_on_one_node_alone(tmp_path, start, peer_nodes) -> None:
    """Each node commits a global step on its own disk: removed on node 0 alone, the others would go
    on resuming from it, so ``snapd rm`` there is refused, saying why, and the step stays."""
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "1,2")
    assert all(o.split() == ["COMMITTED", "1", "COMMITTED", "2"] for o in outs), (outs, nodes.logs())
    out = subprocess.run([sys.executable, "-m", "snapd", "rm", "g", "2", "--endpoint",
                          nodes.daemons[0].endpoint], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 2 and "step 2 of job g is a global snapshot" in out.stderr, out.stderr
    assert (nodes.daemons[0].root / "g" / "step-000000000002" / "manifest.json").exists()


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_an_incremental_part_sends_only_what_changed(tmp_path, start, where, peer_nodes) -> None:
    """Each rank's 8 MiB frozen base is shared by step 2 with step 1 on its own disk (hard links);
    its replica holder takes it from its copy of step 1 instead of receiving it again, and a lost
    node's rank restores step 2 from that replica, base and all."""
    extra = ("--replica-memory-bytes", "0") if where == "disk" else ()
    nodes = peer_nodes.Nodes(tmp_path, start, 2, *extra, replica_dirs=where == "disk")

    def held(step: int) -> bool:
        return all(nodes.status(i)["peers"]["held"]["jobs"].get("g", {}).get(str(step)) == [1 - i]
                   for i in (0, 1))

    def sent() -> list[int]:
        return [nodes.status(i)["peers"]["peers"][0]["replicated_bytes"] for i in (0, 1)]

    for step in (1, 2):
        outs = peer_nodes.ranks(nodes, "g", "run-1", str(step), "frozen", world=2)
        assert [o.split() for o in outs] == [["COMMITTED", str(step)]] * 2, nodes.logs()
        nodes.daemons[0].wait_for(lambda step=step: held(step), timeout=60)
        if step == 1:
            first = sent()
    second = [b - a for a, b in zip(first, sent())]
    assert all(b > 4 << 20 for b in first) and all(b < 1 << 20 for b in second), (first, second)  # (coded)
    assert "MiB of it shared with step 1, not sent" in nodes.daemons[0].log_text(), nodes.logs()
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "3", "restore", "frozen", world=2)
    for r, o in enumerate(outs):
        assert o.split()[:6] == ["RESTORED", "2", str(200 + r), "2.0", "BASE", "ok"], (o, nodes.logs())


def test_a_job_sets_its_own_replication_factor(tmp_path, start, peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 3)  # (the daemons' own factor: 1)

    def rank(r: int) -> None:
        with snapd.connect("two", endpoint=nodes.daemons[r].endpoint, spawn=False, rank=r, world_size=3,
                           run_id="x", per_rank=["w"], replicas=2) as c:
            c.snapshot({"w": np.full(1000, r, np.float32)}, step=1).wait(60)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(rank, range(3)))
    for i in range(3):  # every node holds the other two ranks' parts
        nodes.daemons[i].wait_for(lambda i=i: nodes.status(i)["peers"]["held"]["jobs"].get("two", {}).get("1")
                                  == sorted({0, 1, 2} - {i}), timeout=30)
    with pytest.raises(snapd.InvalidArgument, match="replicas must be"):
        snapd.connect("two", endpoint=nodes.daemons[0].endpoint, spawn=False, replicas=9)


def test_one_client_cannot_queue_the_peers_work_away_from_the_others(tmp_path, start, peer_nodes) -> None:
    create(tmp_path / "keys")
    ep, gone = (f"tcp://127.0.0.1:{p}" for p in peer_nodes.free_ports(2))  # (nobody answers at ``gone``)
    d = start("--peer-endpoint", ep, "--peers", f"{ep},{gone}", "--peer-keys", str(tmp_path / "keys"),
              "--peer-timeout-s", "2", name="d", root=tmp_path / "root")
    with snapd.connect("flood", endpoint=d.endpoint, spawn=False, rank=0, world_size=2, run_id="x") as c:
        ids = [c._conn.send("locate", step=None) for _ in range(24)]  # each waits 2 s on the silent peer
        codes = []
        for i in ids:
            try:
                codes.append(c._conn.wait(i, 60)["type"])
            except snapd.Busy as e:
                codes.append(e.code)
        assert codes.count("busy") == 24 - 16 and codes.count("located") == 16, codes
        assert c._conn.call("ping")["type"] == "pong"


def test_a_peer_without_the_cluster_key_is_refused_and_logged(tmp_path, start, peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 1)
    d, endpoint = nodes.daemons[0], nodes.endpoints[0]
    server_key = PeerKeys.load(nodes.keys).public
    ctx = zmq.Context()
    try:
        # a stranger: its own key pair, and the server's public key (which is no secret)
        s = ctx.socket(zmq.DEALER)
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.curve_serverkey = server_key
        s.connect(endpoint)
        s.send_multipart([json.dumps({"t": "have", "job": "g"}).encode()])
        assert not s.poll(2000), "a peer without the key got an answer"
        d.wait_for(lambda: "refused peer" in d.log_text() and "is not in" in d.log_text())
        # no encryption at all: refused in the handshake
        plain = ctx.socket(zmq.DEALER)
        plain.connect(endpoint)
        plain.send_multipart([json.dumps({"t": "have", "job": "g"}).encode()])
        assert not plain.poll(2000)
        d.wait_for(lambda: "handshake failed" in d.log_text())
        # a holder of the key is still served, and a bad request of it gets an error naming it
        good = ctx.socket(zmq.DEALER)
        keys = PeerKeys.load(nodes.keys)
        good.curve_publickey, good.curve_secretkey = keys.public, keys.secret
        good.curve_serverkey = keys.public
        good.connect(endpoint)
        good.send_multipart([json.dumps({"t": "get", "job": "../etc", "step": 1, "rank": 0}).encode()])
        assert good.poll(5000)
        reply = json.loads(good.recv_multipart()[0])
        assert reply["t"] == "error" and "invalid job name" in reply["message"], reply
        for sock in (s, plain, good):
            sock.close(linger=0)
    finally:
        ctx.term()
    assert nodes.status(0)["peers"]["refused"] >= 2


def test_keys_other_users_can_read_are_refused_at_start(tmp_path) -> None:
    create(tmp_path / "keys")
    (tmp_path / "keys" / "cluster.key_secret").chmod(0o644)
    serve = [sys.executable, "-m", "snapd", "serve", "--check-config", "--root", str(tmp_path / "r"),
             "--peer-endpoint", "tcp://127.0.0.1:1"]
    out = subprocess.run([*serve, "--peer-keys", str(tmp_path / "keys")], capture_output=True, text=True,
                         cwd="/")
    assert out.returncode == 2 and "mode 644" in out.stderr and "chmod 600" in out.stderr, out.stderr
    out = subprocess.run(serve, capture_output=True, text=True, cwd="/")
    assert out.returncode == 2 and "peer_keys is not" in out.stderr, out.stderr



@pytest.mark.parametrize("value", ["0", "-1", "nan", "1e9"])
def test_a_peer_check_interval_out_of_range_is_refused_at_start(tmp_path, value: str) -> None:
    create(tmp_path / "keys")
    out = subprocess.run([sys.executable, "-m", "snapd", "serve", "--check-config", "--root",
                          str(tmp_path / "r"), "--peer-endpoint", "tcp://127.0.0.1:1", "--peer-keys",
                          str(tmp_path / "keys"), "--peer-check-s", value], capture_output=True, text=True,
                         cwd="/")
    assert out.returncode == 2 and "peer_check_s must be in [0.1, 86400] seconds" in out.stderr, out.stderr
