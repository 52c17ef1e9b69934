"""``latest`` across the local and the remote tier is the snapshot taken last, as the job's index
orders it, not the highest step (issue 23's tiers, re-checked with issue 26's runs that go back to
an earlier step): the abandoned run's higher steps, still in the bucket, are not resumed from."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np

import snapd.client as snapd
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store


def state(step: int, mark: float) -> dict:
    return {"w": np.random.default_rng(step).standard_normal(5000).astype(np.float32),
            "mark": np.full(16, mark, np.float32), "step": step}


def uploaded(c, d, n: int) -> None:
    deadline = time.monotonic() + 60
    while (r := c.status()["remote"])["uploaded"] < n or r["backlog"] or r["uploading"]:
        assert time.monotonic() < deadline, (r, d.log_text()[-3000:])
        time.sleep(0.1)


def test_latest_in_both_tiers_is_the_snapshot_taken_last_not_the_highest_step(tmp_path, s3, start) -> None:
    url = f"{s3.url}/back"
    d = start("--remote", url)
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        for step in (1, 2, 3):
            c.snapshot(state(step, 0.0), step=step).wait(30)
            uploaded(c, d, step)
        assert c.restore(1)["step"] == 1  # the run goes back to step 1 and makes step 2 again
        c.snapshot(state(2, 1.0), step=2).wait(30)
        uploaded(c, d, 4)
        assert sorted(RemoteJob(Store.open(url), "job").steps()) == [1, 2, 3]  # (step 3 is still there)
        back = c.restore()  # (this node's latest is the new step 2; the bucket's highest, step 3)
        assert back["step"] == 2 and back["mark"][0] == 1.0
    listed = subprocess.run([sys.executable, "-m", "snapd", "ls", str(d.root), "job", "--remote", url],
                            capture_output=True, text=True, cwd="/").stdout
    marked = re.findall(r"^job\s+(\d+)\s.*latest", listed, re.M)
    assert marked == ["2"], listed  # (what load opens: the step taken last, not the highest one)
    fresh = snapd.load(tmp_path / "fresh", "job", remote=url)  # a node with an empty disk
    assert fresh["step"] == 2 and fresh["mark"][0] == 1.0
    assert snapd.load(tmp_path / "fresh", "job", 3, remote=url)["mark"][0] == 0.0  # (by number: still there)
