"""A single process's snapshots on nodes with peers (issue 26): each committed snapshot has a copy
on another node, and a job whose node is lost with its disk resumes on a replacement node from that
copy, bit-exact, with no remote tier; a damaged copy is caught and another used."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import snapd.client as snapd
from snapd.format.manifest import parse

STEP_DIR = "step-{:012d}"


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(300_000).astype(np.float32), "ids": rng.integers(0, 1 << 60, 1000),
            "opt": {"lr": 0.1 * step, "moments": [rng.standard_normal(5000).astype(np.float32)]},
            "step": step}


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and a["opt"]["lr"] == b["opt"]["lr"] and \
        np.asarray(a["w"]).tobytes() == np.asarray(b["w"]).tobytes() and \
        np.array_equal(a["ids"], b["ids"]) and \
        np.asarray(a["opt"]["moments"][0]).tobytes() == np.asarray(b["opt"]["moments"][0]).tobytes()


def held(nodes, i: int, job: str) -> dict:
    return nodes.status(i)["peers"]["held"]["jobs"].get(job, {})


def test_a_lost_nodes_single_process_job_resumes_from_its_copy_on_another_node(tmp_path, start,
                                                                                 peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 3)
    with snapd.connect("solo", endpoint=nodes.daemons[0].endpoint, spawn=False) as c:
        for step in (1, 2):
            c.snapshot(state(step), step=step).wait(60)
    # node 0's copies go to node 1, the ring's next; step 2 held, step 1's copy then dropped
    nodes.daemons[1].wait_for(lambda: held(nodes, 1, "solo") == {"2": [0]}, timeout=30)
    assert held(nodes, 2, "solo") == {}
    where = nodes.status(0)["peers"]["jobs"]["solo"]["2"]
    assert where["disks"] == {"node0": [0]} and where["replicas"] == {"node1": [0]}, where
    assert where["complete"] and where["world_size"] == 1, where
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)  # the replacement node: an empty disk, the same peers
    final = d.root / "solo" / STEP_DIR.format(2)
    with snapd.connect("solo", endpoint=d.endpoint, spawn=False) as c:
        # the connect alone brings it (the trainer's startup and the transfer overlap)
        d.wait_for(lambda: (final / "manifest.json").exists(), timeout=30)
        assert nodes.status(0)["peers"]["prefetched_parts"] == 1
        assert same(c.restore(), state(2))
        assert same(c.restore(2), state(2))
        with pytest.raises(snapd.SnapshotNotFound):  # (step 1's copy is gone everywhere)
            c.restore(1)
        c.snapshot(state(3), step=3).wait(60)  # and the job goes on there
    log = d.log_text()
    assert re.search(r"solo step 2 \(\d+ MiB\) came from tcp://127.0\.0\.1:\d+ in", log), log
    assert log.count(") came from ") == 1, log  # (the restore found it here)
    # committed on the new disk like any snapshot: readable without the daemon, and it verifies
    assert same(snapd.load(d.root, "solo", 2), state(2))
    out = subprocess.run([sys.executable, "-m", "snapd", "verify", str(final)], capture_output=True,
                         text=True, cwd="/")
    assert out.returncode == 0, out
    nodes.daemons[1].wait_for(lambda: held(nodes, 1, "solo") == {"3": [0]}, timeout=30)
    # lost again; the README's loop on the next replacement: list() at once, before the hello's
    # prefetch could have brought anything, must see the step to resume from
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("solo", endpoint=d.endpoint, spawn=False) as c:
        assert [s.step for s in c.list()] == [3], d.log_text()
        assert same(c.restore("latest"), state(3))


def test_a_damaged_copy_of_a_single_process_snapshot_is_caught_and_another_used(tmp_path, start,
                                                                                 peer_nodes) -> None:
    # two copies, on disk (no memory for them), so this test can damage one
    nodes = peer_nodes.Nodes(tmp_path, start, 3, "--replicas", "2", "--replica-memory-bytes", "0",
                             replica_dirs=True)
    with snapd.connect("solo", endpoint=nodes.daemons[0].endpoint, spawn=False) as c:
        c.snapshot(state(1), step=1).wait(60)
    copies = [tmp_path / f"replicas{i}" / "solo" / STEP_DIR.format(1) / "rank-00000" for i in (1, 2)]
    for i, copy in zip((1, 2), copies):
        nodes.daemons[i].wait_for(lambda copy=copy: (copy / "manifest.json").exists(), timeout=30)
    m = parse((copies[0] / "manifest.json").read_bytes())
    c0 = next(t for t in m.tensors if t.chunks).chunks[0]
    data = copies[0] / m.files[c0.file]["name"]
    raw = bytearray(data.read_bytes())
    raw[c0.offset + c0.stored // 2] ^= 0x40
    data.write_bytes(raw)
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("solo", endpoint=d.endpoint, spawn=False) as c:
        assert same(c.restore(), state(1))
    log = d.log_text()
    assert re.search(r"solo step 1 from tcp://127\.0\.0\.1:\d+ unusable \(.*checksum", log), log
    assert f"came from {nodes.endpoints[2]}" in log, log
    assert nodes.status(0)["peers"]["damaged_copies"] == 1


def test_a_frozen_base_of_a_single_process_crosses_the_network_once(tmp_path, start, peer_nodes) -> None:
    """Step 2 shares its 8 MiB frozen base with step 1 on its own disk (hard links): the copy on
    node 1 takes it from its copy of step 1, and a lost node resumes step 2, base and all."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2)
    base = np.random.default_rng(7).standard_normal(2 << 20).astype(np.float32)
    sent = []
    with snapd.connect("frozen", endpoint=nodes.daemons[0].endpoint, spawn=False) as c:
        for step in (1, 2):
            c.snapshot({"base": base, "w": np.full(1000, step, np.float32)}, step=step).wait(60)
            nodes.daemons[1].wait_for(lambda step=step: held(nodes, 1, "frozen") == {str(step): [0]},
                                      timeout=60)
            sent.append(nodes.status(0)["peers"]["peers"][0]["replicated_bytes"])
    assert sent[0] > 4 << 20 and sent[1] - sent[0] < 1 << 20, sent
    assert "MiB of it shared with step 1, not sent" in nodes.daemons[0].log_text(), nodes.logs()
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("frozen", endpoint=d.endpoint, spawn=False) as c:
        back = c.restore()
    assert back["base"].tobytes() == base.tobytes() and float(back["w"][0]) == 2.0, nodes.logs()


def test_a_run_resumed_from_an_earlier_step_resumes_from_its_own_newest(tmp_path, start, peer_nodes) -> None:
    """Steps 1-3, then the job goes back to step 1 (from ``best``, say) and takes step 2 again: that
    step 2 is its latest, and the node's loss must not bring back the abandoned step 3."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2)
    with snapd.connect("back", endpoint=nodes.daemons[0].endpoint, spawn=False) as c:
        for step in (1, 2, 3):
            c.snapshot(state(step), step=step).wait(60)
        assert c.restore(1)["step"] == 1
        redone = {**state(2), "w": state(2)["w"] * -1}
        c.snapshot(redone, step=2).wait(60)
        assert np.array_equal(c.restore()["w"], redone["w"])  # (its index: step 2, taken last)
    nodes.daemons[1].wait_for(lambda: held(nodes, 1, "back") == {"2": [0]}, timeout=30)
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("back", endpoint=d.endpoint, spawn=False) as c:
        back = c.restore()
    assert back["step"] == 2 and np.array_equal(back["w"], redone["w"]), nodes.logs()


def test_a_removed_snapshot_is_not_brought_back_from_its_copy_on_another_node(tmp_path, start,
                                                                              peer_nodes) -> None:
    """Node 1 holds a copy of step 2; removed on node 0 (Client.remove), a restore there resumes from
    step 1 rather than bringing step 2 back from node 1; the step made again is the newest anew."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2)
    with snapd.connect("gone", endpoint=nodes.daemons[0].endpoint, spawn=False, keep_last=None) as c:
        for step in (1, 2):
            c.snapshot(state(step), step=step).wait(60)
        nodes.daemons[1].wait_for(lambda: held(nodes, 1, "gone") == {"2": [0]}, timeout=30)
        assert c.remove(2) is True
        back = c.restore()
        assert back["step"] == 1 and same(back, state(1)), nodes.logs()
        assert [s.step for s in c.list()] == [1]
        redone = {**state(2), "w": state(2)["w"] * -1}
        c.snapshot(redone, step=2).wait(60)
    nodes.daemons[1].wait_for(lambda: held(nodes, 1, "gone") == {"2": [0]}, timeout=30)
    nodes.lose(0)  # (the removal is remembered on node 0's disk: lost with it, the new step 2 is what counts)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("gone", endpoint=d.endpoint, spawn=False) as c:
        back = c.restore()
    assert back["step"] == 2 and np.array_equal(back["w"], redone["w"]), nodes.logs()


def test_a_copy_owed_to_a_holder_down_when_the_daemon_stopped_is_sent_once_it_answers(tmp_path, start,
                                                                                      peer_nodes) -> None:
    """Node 1, the copy's holder, hangs while node 0 commits the job's last snapshot; node 0's daemon
    is then restarted (SIGTERM: its drain does not wait for a holder that is down), and node 1 comes
    back. The new run sends the copy its last run owed node 1 (it was sent only with the job's next
    snapshot, which never came), so node 0 lost with its disk still resumes bit-exact."""

    nodes = peer_nodes.Nodes(tmp_path, start, 2)
    nodes.daemons[1].proc.send_signal(signal.SIGSTOP)
    try:
        with snapd.connect("solo", endpoint=nodes.daemons[0].endpoint, spawn=False) as c:
            c.snapshot(state(1), step=1).wait(60)
        nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["peers"][0]["backlog_parts"] == 1)
        assert nodes.daemons[0].stop(signal.SIGTERM) == 0
        nodes.daemons[0] = nodes.start(0)  # (its root stays: the snapshot is on its disk)
    finally:
        nodes.daemons[1].proc.send_signal(signal.SIGCONT)
    nodes.daemons[1].wait_for(lambda: held(nodes, 1, "solo") == {"1": [0]}, timeout=60)
    assert "1 part(s) this daemon's last run sent 1 holder(s)" in nodes.daemons[0].log_text(), nodes.logs()
    nodes.lose(0)
    nodes.daemons[0] = d = nodes.start(0)
    with snapd.connect("solo", endpoint=d.endpoint, spawn=False) as c:
        assert same(c.restore(), state(1)), nodes.logs()
