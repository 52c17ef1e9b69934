"""PyTorch Lightning through ``SnapdCheckpointIO`` (snapd.integrations.lightning), a real Trainer and a
real daemon: a trainer killed right after a checkpoint was handed over resumes with
``fit(ckpt_path="last")`` from that checkpoint, whose tensors equal Lightning's own save of the same
state bit for bit; Lightning's top-k removals remove the snapshots; values that would need pickle
are refused by name."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

from snapd.format import catalog  # noqa: E402
from snapd.integrations.lightning import SnapdCheckpointIO, pointed_at  # noqa: E402

JOB = Path(__file__).parent / "scripts" / "lightning_job.py"


def run(mode: str, endpoint: str, ckpts: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), mode, endpoint, str(ckpts)], capture_output=True,
                          text=True, timeout=240)


def same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, torch.as_tensor(b)) and a.dtype == b.dtype, where
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_trainer_resumes_from_last_bit_exact(tmp_path, daemon) -> None:
    ckpts = tmp_path / "ckpts"
    killed = run("train", daemon.endpoint, ckpts)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    io = SnapdCheckpointIO("lt", endpoint=daemon.endpoint, spawn=False)
    ours = io.load_checkpoint(ckpts / "last.ckpt", map_location="cpu")
    theirs = TorchCheckpointIO().load_checkpoint(f"{ckpts / 'epoch=0-step=6.ckpt'}.torch",
                                                 weights_only=False)
    assert ours["global_step"] == 6
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "hyper_parameters", "epoch"):
        same(ours[key], theirs[key], key)
    io.teardown()
    resumed = run("resume", daemon.endpoint, ckpts)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.findall(r"RESUMED (\d+)", resumed.stdout) == ["6"], resumed.stdout
    # Lightning kept the top 2 by loss and last.ckpt: the snapshots are those its files name, no more
    named = {pointed_at(p)[1] for p in ckpts.glob("*.ckpt")}
    assert {s.step for s in catalog.list_snapshots(daemon.root, "lt")} == named


def test_hyper_parameters_that_need_pickle_are_refused_by_name(tmp_path, daemon) -> None:
    out = run("hparams", daemon.endpoint, tmp_path / "ckpts")
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    assert "hyper_parameters.extra" in out.stdout and "save_hyperparameters(ignore" in out.stdout, out.stdout
