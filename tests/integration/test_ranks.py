"""Ranks (issue 22, item 1): a client knows its rank, the daemon shows it, and the ranks of one job
share it, each writing its part of each global snapshot; but no two live processes write one job
as the same rank, or with world sizes that disagree (a single process is world size 1): the second
is refused, naming the first."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import snapd.client as snapd
from snapd.errors import SnapdError

SCRIPT = Path(__file__).parent / "scripts" / "ranks_connect.py"
HOLD = ("import sys, snapd.client as s; c = s.connect('held', endpoint=sys.argv[1], spawn=False, rank=1, "
        "world_size=2); print('READY', flush=True); sys.stdin.read()")


def test_a_second_process_for_a_job_is_refused_until_the_first_is_gone(daemon) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, daemon.endpoint], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout.readline().strip() == "READY"
        with snapd.connect("other", endpoint=daemon.endpoint, spawn=False) as c:
            [row] = [x for x in c.status()["clients"] if x["job"] == "held"]
            assert (row["rank"], row["world_size"], row["pid"]) == (1, 2, holder.pid)
        with snapd.connect("held", endpoint=daemon.endpoint, spawn=False, rank=0, world_size=2) as other:
            assert (other.rank, other.world_size) == (0, 2)  # another rank of the job: welcome
        with pytest.raises(SnapdError) as e:
            snapd.connect("held", endpoint=daemon.endpoint, spawn=False, rank=0, world_size=3)
        assert e.value.code == "job_in_use"
        assert f"world size 2 here (rank 1, pid {holder.pid})" in str(e.value)
        with pytest.raises(SnapdError) as e:
            snapd.connect("held", endpoint=daemon.endpoint, spawn=False)
        assert e.value.code == "job_in_use" and "this process says 1" in str(e.value)
        with pytest.raises(SnapdError, match="claim the same rank"):
            snapd.connect("held", endpoint=daemon.endpoint, spawn=False, rank=1, world_size=2)
        with pytest.raises(SnapdError, match="is not a rank of world size 2"):
            from snapd.client.connection import Connection  # (the client checks it first: ask raw)

            conn = Connection(daemon.endpoint, 5)
            try:
                conn.call("hello", job="odd", pid=1, on_busy="wait", rank=2, world_size=2)
            finally:
                conn.close()
    finally:
        holder.stdin.close()
        holder.wait(30)
    with snapd.connect("held", endpoint=daemon.endpoint, spawn=False) as c:  # (its writer is gone)
        c.snapshot({"step": 1}, step=1).wait(30)
    zombie = subprocess.Popen([sys.executable, "-c", HOLD, daemon.endpoint], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    assert zombie.stdout.readline().strip() == "READY"
    zombie.kill()  # (not waited for: a zombie until its parent, this test, reaps it)
    deadline = time.monotonic() + 10
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with snapd.connect("held", endpoint=daemon.endpoint, spawn=False) as c:  # a zombie writes nothing
        c.snapshot({"step": 2}, step=2).wait(30)
    zombie.wait()
    with snapd.connect("held", endpoint=daemon.endpoint, spawn=False) as a, \
            snapd.connect("held", endpoint=daemon.endpoint, spawn=False) as b:  # one process: fine
        assert a.job == b.job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_ranks_are_learned_and_share_a_job(daemon, torchrun) -> None:
    out = torchrun(SCRIPT, daemon.endpoint)
    assert sorted(re.findall(r"OWN (\d) 2 (\d)", out.stdout)) == [("0", "0"), ("1", "1")], out.stdout
    assert out.stdout.count("SHARED-OK") == 2 and "REFUSED" not in out.stdout, out.stdout
