"""Peer replicas (issue 26): daemons with separate roots on loopback TCP stand for nodes that share
no filesystem. A job's global snapshot commits across them, every part has a copy on another node,
and a node lost with its disk comes back from its peers, with no remote tier."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zmq

import snapd.client as snapd
from snapd.errors import SnapshotNotFound
from snapd.format.manifest import parse
from snapd.peers.directory import RELOAD_S
from snapd.peers.keys import PeerKeys, create

RANK = Path(__file__).parent / "scripts" / "rank_job.py"
FSDP2 = Path(__file__).parent / "scripts" / "fsdp2_job.py"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Nodes:
    """``n`` daemons, each with its own root, that know each other as peers (one cluster key)."""

    def __init__(self, tmp: Path, start, n: int, *extra: str, replica_dirs: bool = False) -> None:
        self.tmp, self._start, self.extra, self.replica_dirs = tmp, start, extra, replica_dirs
        self.keys = tmp / "keys"
        create(self.keys)
        # sorted: node i is the i-th round the ring, so node i's replicas go to node i + 1
        self.endpoints = sorted(f"tcp://127.0.0.1:{p}" for p in free_ports(n))
        self.daemons = [self.start(i) for i in range(n)]

    def start(self, i: int):
        own = ("--replica-dir", str(self.tmp / f"replicas{i}")) if self.replica_dirs else ()
        return self._start("--peer-endpoint", self.endpoints[i], "--peers", ",".join(self.endpoints),
                           "--peer-keys", str(self.keys), "--node-name", f"node{i}", "--peer-timeout-s", "2",
                           *self.extra, *own, name=f"node{i}-{time.monotonic_ns()}",
                           root=self.tmp / f"node{i}")

    def lose(self, i: int) -> None:
        """Node ``i`` is gone: its daemon killed, its disk with it."""
        d = self.daemons[i]
        d.proc.kill()
        d.proc.wait()
        shutil.rmtree(d.root)
        shutil.rmtree(self.tmp / f"replicas{i}", ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {d.log}\n{d.log_text()[-3000:]}" for d in self.daemons)

    def status(self, i: int) -> dict:
        out = subprocess.run([sys.executable, "-m", "snapd", "status", "--json", "--endpoint",
                              self.daemons[i].endpoint], capture_output=True, text=True, cwd="/")
        return json.loads(out.stdout)


def ranks(nodes: Nodes, job: str, run: str, steps: str, *more: str, world: int = 3) -> list[str]:
    procs = [subprocess.Popen([sys.executable, str(RANK), nodes.daemons[r].endpoint, job, str(r), str(world),
                               run, steps, *more], stdout=subprocess.PIPE, text=True, cwd="/")
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(nodes.logs())
    return outs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_node_of_an_fsdp2_job_resumes_bit_exact_from_its_peers_replicas(tmp_path, start, torchrun):
    nodes = Nodes(tmp_path, start, 3)
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


def test_parts_commit_across_nodes_and_a_lost_node_restores_from_replicas(tmp_path, start) -> None:
    nodes = Nodes(tmp_path, start, 3)
    outs = ranks(nodes, "g", "run-1", "1,2")
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
    outs = ranks(nodes, "g", "run-2", "3", "restore")
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


def test_a_damaged_replica_is_caught_and_another_copy_used(tmp_path, start) -> None:
    # two replicas of each part, kept on disk (no memory for them), so this test can damage one
    nodes = Nodes(tmp_path, start, 3, "--replicas", "2", "--replica-memory-bytes", "0", replica_dirs=True)
    outs = ranks(nodes, "g", "run-1", "1")
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
    outs = ranks(nodes, "g", "run-2", "2", "restore")
    assert [o.split()[:4] for o in outs] == [["RESTORED", "1", str(100 + r), "1.0"] for r in range(3)], \
        (outs, nodes.logs())
    log = nodes.daemons[2].log_text()
    assert re.search(r"rank 2's part from tcp://127.0.0.1:\d+ unusable \(.*checksum", log), log
    assert "rank 2's part (0 MiB) came from " + nodes.endpoints[1] in log, log
    assert log.count("rank 2's part (0 MiB) came from ") == 1, log  # (its prefetch and restore: one fetch)


def test_a_replacement_node_brings_a_ranks_part_when_the_rank_connects(tmp_path, start) -> None:
    """The trainer's startup and the part's transfer overlap: the part is here before ``restore``."""
    nodes = Nodes(tmp_path, start, 3)
    outs = ranks(nodes, "g", "run-1", "1,2")
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


def test_a_newer_step_the_bucket_holds_wins_its_missing_part_from_there(tmp_path, start, s3) -> None:
    """Step 1 is replicated; step 2 is not (``replicas=0``) but reaches the bucket. Node 1 is lost:
    the nodes still hold step 1 whole, the bucket step 2; the resume takes step 2, rank 0's part
    from node 0's disk and rank 1's from the bucket."""
    nodes = Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/newer")
    outs = ranks(nodes, "g", "run-1", "1", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"].get("g", {}).get("1") == [1],
                              timeout=30)
    outs = ranks(nodes, "g", "run-1", "2", "replicas=0", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "2"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["jobs"]["g"]["2"]["remote"] is True,
                              timeout=60)
    assert nodes.status(0)["peers"]["held"]["jobs"]["g"] == {"1": [1]}  # (no replica of step 2)
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = ranks(nodes, "g", "run-2", "3", "restore", world=2)
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


def test_a_bucket_that_does_not_answer_leaves_the_peers_restore_alone(tmp_path, start, s3) -> None:
    nodes = Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/down")
    outs = ranks(nodes, "g", "run-1", "1", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"].get("g", {}).get("1") == [1],
                              timeout=30)
    s3.stop()
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = ranks(nodes, "g", "run-2", "2", "restore", world=2)
    for r, o in enumerate(outs):
        assert o.split()[:4] == ["RESTORED", "1", str(100 + r), "1.0"], (o, nodes.logs())
    assert "the remote tier does not answer for g" in nodes.daemons[1].log_text(), nodes.logs()


def test_a_bucket_that_hangs_holds_up_no_snapshot_status_start_or_restore(tmp_path, start, s3) -> None:
    """Peers found through the bucket (its reads are the peer directory's thread's alone), parts
    uploaded to it (the upload thread's), and offered by it to a restore (waited for 20 s at most
    where the nodes hold the step whole)."""
    nodes = Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/hang")
    outs = ranks(nodes, "g", "run-1", "1", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1"]] * 2, nodes.logs()
    assert s3.proc is not None
    os.kill(s3.proc.pid, signal.SIGSTOP)  # (it takes connections, and answers nothing for 60 s)
    try:
        time.sleep(RELOAD_S + 1)  # (the peer entries are due to be read again)
        for d in nodes.daemons:
            out = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", d.endpoint],
                                 capture_output=True, text=True, cwd="/", timeout=30)
            assert out.returncode == 0 and "peers:" in out.stdout, out
        outs = ranks(nodes, "g", "run-1", "2", world=2)
        assert [o.split() for o in outs] == [["COMMITTED", "2"]] * 2, nodes.logs()
        nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"]["g"].get("2") == [1],
                                  timeout=30)
        nodes.lose(1)
        nodes.daemons[1] = nodes.start(1)  # (its start does not wait for the bucket)
        outs = ranks(nodes, "g", "run-2", "3", "restore", world=2)
        for r, o in enumerate(outs):
            assert o.split()[:4] == ["RESTORED", "2", str(200 + r), "2.0"], (o, nodes.logs())
        assert "the remote tier does not answer for g within 20 s" in nodes.daemons[1].log_text()
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_an_incremental_part_sends_only_what_changed(tmp_path, start, where) -> None:
    """Each rank's 8 MiB frozen base is shared by step 2 with step 1 on its own disk (hard links);
    its replica holder takes it from its copy of step 1 instead of receiving it again, and a lost
    node's rank restores step 2 from that replica, base and all."""
    extra = ("--replica-memory-bytes", "0") if where == "disk" else ()
    nodes = Nodes(tmp_path, start, 2, *extra, replica_dirs=where == "disk")

    def held(step: int) -> bool:
        return all(nodes.status(i)["peers"]["held"]["jobs"].get("g", {}).get(str(step)) == [1 - i]
                   for i in (0, 1))

    def sent() -> list[int]:
        return [nodes.status(i)["peers"]["peers"][0]["replicated_bytes"] for i in (0, 1)]

    for step in (1, 2):
        outs = ranks(nodes, "g", "run-1", str(step), "frozen", world=2)
        assert [o.split() for o in outs] == [["COMMITTED", str(step)]] * 2, nodes.logs()
        nodes.daemons[0].wait_for(lambda step=step: held(step), timeout=60)
        if step == 1:
            first = sent()
    second = [b - a for a, b in zip(first, sent())]
    assert all(b > 4 << 20 for b in first) and all(b < 1 << 20 for b in second), (first, second)  # (coded)
    assert "MiB of it shared with step 1, not sent" in nodes.daemons[0].log_text(), nodes.logs()
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = ranks(nodes, "g", "run-2", "3", "restore", "frozen", world=2)
    for r, o in enumerate(outs):
        assert o.split()[:6] == ["RESTORED", "2", str(200 + r), "2.0", "BASE", "ok"], (o, nodes.logs())


def test_a_peer_down_during_snapshots_delays_only_replication(tmp_path, start) -> None:
    nodes = Nodes(tmp_path, start, 3)
    # the ring sends node 1's parts to node 2: node 2 stops answering (a hung or unreachable node)
    nodes.daemons[2].proc.send_signal(signal.SIGSTOP)
    try:  # the three steps commit while node 2 does not answer: they never wait for it
        outs = ranks(nodes, "g", "run-1", "1,2,3", world=2)
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


def test_a_job_sets_its_own_replication_factor(tmp_path, start) -> None:
    nodes = Nodes(tmp_path, start, 3)  # (the daemons' own factor: 1)

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


def test_daemons_find_each_other_through_the_remote_tier_or_a_shared_directory(tmp_path, start, s3) -> None:
    create(tmp_path / "keys")
    eps = sorted(f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    # no --peers: node 0 and node 1 meet in the bucket they both upload to; node 1 also via a directory
    a = start("--peer-endpoint", eps[0], "--peer-keys", str(tmp_path / "keys"), "--node-name", "a",
              "--remote", f"{s3.url}/found", name="a", root=tmp_path / "a")
    b = start("--peer-endpoint", eps[1], "--peer-keys", str(tmp_path / "keys"), "--node-name", "b",
              "--remote", f"{s3.url}/found", "--peer-directory", str(tmp_path / "shared"), name="b",
              root=tmp_path / "b")
    assert json.loads((tmp_path / "shared" / "b.peer").read_text())["endpoint"] == eps[1]
    procs = [subprocess.Popen([sys.executable, str(RANK), d.endpoint, "g", str(r), "2", "run-1", "1"],
                              stdout=subprocess.PIPE, text=True, cwd="/") for r, d in enumerate((a, b))]
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


def test_one_client_cannot_queue_the_peers_work_away_from_the_others(tmp_path, start) -> None:
    create(tmp_path / "keys")
    ep, gone = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))  # (nobody answers at ``gone``)
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


def test_sigterm_waits_for_the_parts_to_reach_their_replica_holders(tmp_path, start) -> None:
    # replication bound to 4 KiB/s: rank 1's part (16 KiB) takes about 4 s to reach node 0
    nodes = Nodes(tmp_path, start, 2, "--peer-bytes-per-s", "4096")
    outs = ranks(nodes, "g", "run-1", "1", world=2)
    assert all(o.split() == ["COMMITTED", "1"] for o in outs), (outs, nodes.logs())
    assert nodes.daemons[1].stop(signal.SIGTERM) == 0  # (the node is being drained: it is going away)
    assert "g step 1 rank 1 replicated to" in nodes.daemons[1].log_text(), nodes.logs()
    assert nodes.status(0)["peers"]["held"]["jobs"]["g"] == {"1": [1]}


def test_a_peer_without_the_cluster_key_is_refused_and_logged(tmp_path, start) -> None:
    nodes = Nodes(tmp_path, start, 1)
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

