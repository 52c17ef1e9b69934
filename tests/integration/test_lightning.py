"""PyTorch Lightning through ``SnapdCheckpointIO`` (snapd.integrations.lightning), a real Trainer and a
real daemon: a trainer killed right after a checkpoint was handed over resumes with
``fit(ckpt_path="last")`` from that checkpoint, whose tensors equal Lightning's own save of the same
state bit for bit; Lightning's top-k removals remove the snapshots; values that would need pickle
are refused by name."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

from snapd.errors import SnapshotNotFound  # noqa: E402
from snapd.format import catalog  # noqa: E402
from snapd.integrations.lightning import SnapdCheckpointIO, pointed_at  # noqa: E402

JOB = Path(__file__).parent / "scripts" / "lightning_job.py"


def run(mode: str, endpoint: str, ckpts: Path) -> subprocess.CompletedProcess:
    # a session of its own: the DDP job SIGKILLs its whole process group
    return subprocess.run([sys.executable, str(JOB), mode, endpoint, str(ckpts)], capture_output=True,
                          text=True, timeout=240, start_new_session=True)


def digest(checkpoint: dict) -> str:
    """What lightning_job.py prints for a module and optimizer restored from ``checkpoint``."""
    tensors = {f"w.{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, s in checkpoint["optimizer_states"][0]["state"].items():
        tensors.update({f"o.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_ranks_resume_from_last_through_the_plugin(tmp_path, daemon) -> None:
    """Lightning's DDP on 2 CPU ranks (its own launcher): rank 0 saves through the plugin, the whole
    job is SIGKILLed right after step 6's ``last.ckpt``, and ``fit(ckpt_path="last")`` restores on
    both ranks the weights and AdamW state Lightning's own save of that checkpoint holds."""
    ckpts = tmp_path / "ckpts"
    killed = run("ddp-train", daemon.endpoint, ckpts)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    saved = TorchCheckpointIO().load_checkpoint(f"{ckpts / 'last.ckpt'}.torch", weights_only=False)
    io = SnapdCheckpointIO("lt", endpoint=daemon.endpoint, spawn=False)
    ours = io.load_checkpoint(ckpts / "last.ckpt")
    io.teardown()
    same(ours["state_dict"], saved["state_dict"], "state_dict")
    same(ours["optimizer_states"], saved["optimizer_states"], "optimizer_states")
    resumed = run("ddp-resume", daemon.endpoint, ckpts)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    starts = sorted(re.findall(r"RESUMED (\d) (\d+) ([0-9a-f]{16})", resumed.stdout))
    assert starts == [("0", "6", digest(saved)), ("1", "6", digest(saved))], resumed.stdout
    finals = dict(re.findall(r"FINAL (\d) ([0-9a-f]{16})", resumed.stdout))
    assert set(finals) == {"0", "1"} and finals["0"] == finals["1"], resumed.stdout
    named = {pointed_at(p)[1] for p in ckpts.glob("*.ckpt")}
    assert {s.step for s in catalog.list_snapshots(daemon.root, "lt")} == named


def test_a_rank_without_the_root_is_told_at_once(tmp_path) -> None:
    """A DDP rank on a node where rank 0's root is absent: a clear error naming it, not a wait."""
    from snapd.integrations.lightning import POINTER_MAGIC, _write_pointer

    ckpt = tmp_path / "last.ckpt"
    _write_pointer(ckpt, {"magic": POINTER_MAGIC, "job_dir": str(tmp_path / "elsewhere" / "lt"), "step": 6})
    io = SnapdCheckpointIO("lt", spawn=False, wait_s=60)
    with pytest.raises(SnapshotNotFound, match="root is not on this node") as e:
        io.load_checkpoint(ckpt)
    assert str(tmp_path / "elsewhere" / "lt") in str(e.value)
