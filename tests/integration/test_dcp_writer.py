"""``dcp.save`` and ``dcp.async_save`` through ``snapd.dcp.SnapshotWriter`` (snapd.integrations.dcp_writer):
on 2 ranks with gloo they load back through ``dcp.load`` equal to DCP's own FileSystemWriter of the
same state; in one process, a trainer killed right after ``async_save`` returned still has its
checkpoint committed; bad checkpoint ids and values DCP would pickle are refused by name."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import snapd.client as snapd
from snapd.dcp import SnapshotReader, SnapshotWriter
from snapd.errors import InvalidArgument, UnsupportedValueError
from snapd.format import catalog

SCRIPTS = Path(__file__).parent / "scripts"

KILLED = """
import os, signal, sys, torch, torch.distributed.checkpoint as dcp
from snapd.dcp import SnapshotWriter
root, fs, endpoint = sys.argv[1:4]
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 256)).sum().backward(); opt.step()
state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3}
dcp.save(state, checkpoint_id=fs, no_dist=True)  # DCP's own, of the same state
w = SnapshotWriter(root + "/killed/step-7", endpoint=endpoint, spawn=False)
dcp.async_save(state, checkpoint_id=root + "/killed/step-7", storage_writer=w, async_stager=w, no_dist=True)
with torch.no_grad():
    model.weight.add_(1.0)  # training goes on: the snapshot keeps the staged values
print("handed over", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _fresh() -> dict:
    torch.manual_seed(5)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 0}


def _equal(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p, s in a["optim"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optim"]["state"][p][k]), (p, k)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dcp_save_and_async_save_on_two_ranks_load_as_dcps_own(tmp_path, torchrun, start) -> None:
    d = start(name="a")
    out = torchrun(SCRIPTS / "dcp_writer_job.py", str(d.root), "dcpw", str(tmp_path / "fs"),
                   d.endpoint).stdout
    assert sorted(re.findall(r"DCP-WRITER (\d)", out)) == ["0", "1"], out
    assert [s.step for s in catalog.list_snapshots(d.root, "dcpw")] == [1, 2, 3]


def test_a_trainer_killed_after_async_save_returned_has_its_checkpoint(tmp_path, daemon) -> None:
    fs = tmp_path / "fs"
    p = subprocess.run([sys.executable, "-c", KILLED, str(daemon.root), str(fs), daemon.endpoint],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and "handed over" in p.stdout, p.stdout + p.stderr
    deadline = time.monotonic() + 30
    while not catalog.list_snapshots(daemon.root, "killed") if (daemon.root / "killed").is_dir() else True:
        assert time.monotonic() < deadline, "the handed-over checkpoint was not committed"
        time.sleep(0.1)
    ours, theirs = _fresh(), _fresh()
    dcp.load(ours, storage_reader=SnapshotReader(daemon.root / "killed" / "step-7"), no_dist=True)
    dcp.load(theirs, checkpoint_id=fs, no_dist=True)
    _equal(ours, theirs)
    assert ours["epoch"] == 3
    whole = snapd.load(daemon.root, "killed", 7)  # and snapd's own reader
    assert torch.equal(torch.as_tensor(whole["model"]["weight"]), theirs["model"]["weight"])


def test_dcp_save_in_one_process_and_what_is_refused(tmp_path, daemon) -> None:
    state = {"w": torch.arange(12.0).reshape(3, 4), "nested": {"b": torch.ones(5, dtype=torch.bfloat16),
                                                                 "lr": 0.5, "name": "run"}}
    path = daemon.root / "one" / "step-4"
    with SnapshotWriter(endpoint=daemon.endpoint, spawn=False) as w:
        dcp.save(state, checkpoint_id=path, storage_writer=w, no_dist=True)
    back = {"w": torch.zeros(3, 4), "nested": {"b": torch.zeros(5, dtype=torch.bfloat16), "lr": 0.0,
                                               "name": ""}}
    dcp.load(back, storage_reader=SnapshotReader(path), no_dist=True)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["nested"]["b"], state["nested"]["b"])
    assert back["nested"]["lr"] == 0.5 and back["nested"]["name"] == "run"
    assert np.array_equal(snapd.load(daemon.root, "one", 4)["w"], state["w"].numpy())
    # a checkpoint id that is not <root>/<job>/step-<N>
    for bad in (tmp_path / "x", daemon.root / "one" / "step-x", daemon.root / "bad name" / "step-1"):
        with pytest.raises(InvalidArgument, match="checkpoint_id|job name"):
            dcp.save(state, checkpoint_id=bad, storage_writer=SnapshotWriter(endpoint=daemon.endpoint),
                     no_dist=True)
    # async_save with a writer that does not know where yet: it stages first
    w = SnapshotWriter(endpoint=daemon.endpoint, spawn=False)
    with pytest.raises(InvalidArgument, match="make the writer with the path"):
        dcp.async_save(state, checkpoint_id=path, storage_writer=w, async_stager=w, no_dist=True)
    # another root than the daemon's (DCP hands on what its writer raised as a CheckpointException)
    with pytest.raises((InvalidArgument, CheckpointException), match="not job 'one' under"):
        dcp.save(state, checkpoint_id=tmp_path / "elsewhere" / "one" / "step-1",
                 storage_writer=SnapshotWriter(endpoint=daemon.endpoint, spawn=False), no_dist=True)
    # a value DCP would pickle is named
    with pytest.raises((UnsupportedValueError, CheckpointException), match="nested.obj"):
        dcp.save({"w": state["w"], "nested": {"obj": object()}}, checkpoint_id=daemon.root / "one" / "step-5",
                 storage_writer=SnapshotWriter(endpoint=daemon.endpoint, spawn=False), no_dist=True)
    # async_save in a loop, each call its writer: the future ends committed, with the state staged
    # when the call returned (the training thread changes it at once)
    w_ = torch.arange(12.0).reshape(3, 4)
    for step in (6, 7):
        path = daemon.root / "one" / f"step-{step}"
        w = SnapshotWriter(path, endpoint=daemon.endpoint, spawn=False)
        fut = dcp.async_save({"w": w_}, checkpoint_id=path, storage_writer=w, async_stager=w, no_dist=True)
        w_.add_(100.0)
        fut.result(timeout=60)
        w.close()
        assert np.array_equal(snapd.load(daemon.root, "one", step)["w"], w_.numpy() - 100.0)
    # a caller that stages and saves on another thread without DCP's synchronize_staging (the gate
    # that holds async_save's save thread back is bounded): still saved
    path = daemon.root / "one" / "step-8"
    with SnapshotWriter(path, endpoint=daemon.endpoint, spawn=False) as w:
        staged = w.stage({"w": w_})
        with ThreadPoolExecutor(1) as pool:
            pool.submit(dcp.save, staged, checkpoint_id=path, storage_writer=w, no_dist=True).result(60)
    assert np.array_equal(snapd.load(daemon.root, "one", 8)["w"], w_.numpy())
    assert [s.step for s in catalog.list_snapshots(daemon.root, "one")] == [4, 6, 7, 8]
