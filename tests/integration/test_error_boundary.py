"""One error boundary: a bug of ours in any stage (planted by scripts/faulty_daemon.py in a real
daemon) fails the snapshot it hit, naming the stage, is logged once, and every other snapshot, of
that client and of the next, is served as before."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd
from snapd.errors import SnapshotError

FAULTY = Path(__file__).parent / "scripts" / "faulty_daemon.py"


@pytest.mark.parametrize("stage, named", [("handoff", "receive"), ("copy", "copy"), ("flush", "flush")])
def test_a_stage_that_raises_fails_its_snapshot_and_the_daemon_serves_on(start, stage, named) -> None:
    d = start(command=[sys.executable, str(FAULTY), stage, "2"])
    w = np.arange(4096, dtype=np.float32)
    with snapd.connect("bugs", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        state = {"w": w.copy(), "step": 0}
        if stage == "copy":  # the registered path: the daemon's copy thread reads the region
            c.share(state)
        for step in (1, 2, 3):
            state["w"][:] = w + step
            state["step"] = step
            p = c.snapshot(state, step=step)
            if step != 2:
                assert p.wait(30).step == step
                continue
            with pytest.raises(SnapshotError) as e:
                p.wait(30)
            assert e.value.stage == named and e.value.code == "internal", e.value
            assert "Planted" in str(e.value)
        st = c.status()
        assert st["in_flight"] == {} and st["buffers"]["busy"] == 0 and st["counters"]["failed"] == 1, st
    with snapd.connect("after", endpoint=d.endpoint, spawn=False) as c:  # (the next client is served too)
        assert c.snapshot({"w": w}, step=4).wait(30).step == 4
    assert [s.step for s in snapd.list_snapshots(d.root, "bugs")] == [1, 3]
    assert snapd.load(d.root, "bugs", 3)["w"].tobytes() == (w + 3).tobytes()
    assert d.log_text().count(f"failed in {named}") == 1, d.log_text()
    assert d.proc.poll() is None
