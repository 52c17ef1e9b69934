"""The Hugging Face Trainer through ``SnapdCallback`` (snapd.integrations.hf), a tiny GPT-2 built from a
config and a real daemon: the Trainer's own save is replaced at its save steps; a trainer killed
right after a snapshot was handed over resumes from it (``checkpoint_dir``) with its state equal
to the framework's own serialization of it, and ends bit for bit where an uninterrupted run ends.
(transformers runs in subprocesses, from outside snapd's clone: see scripts/hf_job.py.)"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from snapd.format import catalog

JOB = Path(__file__).parent / "scripts" / "hf_job.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")


def run(mode: str, endpoint: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(JOB), mode, endpoint, str(out), *extra], capture_output=True,
                          text=True, timeout=300, cwd=out)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("share", [[], ["share"]], ids=["copied", "shared"])
def test_a_killed_trainer_resumes_from_its_snapshot_and_ends_where_an_uninterrupted_run_ends(tmp_path, daemon,
                                                                                          share) -> None:
    full = run("full", daemon.endpoint, tmp_path / "full")
    assert full.returncode == 0, full.stdout + full.stderr
    killed = run("killed", daemon.endpoint, tmp_path / "out", *share)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*")), "the Trainer saved by itself as well"
    resumed = run("resume", daemon.endpoint, tmp_path / "out", *share)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "EQUAL 0" in resumed.stdout, resumed.stdout
    assert re.findall(r"RESUMED 0 (\d+)", resumed.stdout) == ["6"], resumed.stdout
    assert re.findall(r"FINAL 0 (\w+)", resumed.stdout) == re.findall(r"FINAL 0 (\w+)", full.stdout), \
        resumed.stdout + full.stdout
    assert [s.step for s in catalog.list_snapshots(daemon.root, "hf")] == [3, 6, 9]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_data_parallel_ranks_resume_each_with_its_own_rng_and_end_as_uninterrupted(tmp_path,
                                                                                        daemon) -> None:
    """The Trainer under torchrun (DDP, gloo): each rank snapshots its part (the model once, each
    rank's RNG states), both are killed after step 6, and a new 2-rank job resumes from it."""
    launcher = str(Path(sys.executable).parent / "torchrun")

    def ranks(mode: str, out: Path) -> subprocess.CompletedProcess:
        out.mkdir(parents=True, exist_ok=True)
        return subprocess.run([launcher, "--standalone", "--nproc-per-node", "2", str(JOB), mode,
                               daemon.endpoint, str(out)], capture_output=True, text=True, timeout=400,
                              cwd=out, env={**os.environ, "TMPDIR": str(out)})  # (torchrun's log directory)
    full = ranks("full", tmp_path / "full")
    assert full.returncode == 0, full.stdout + full.stderr[-3000:]
    killed = ranks("killed", tmp_path / "out")
    assert killed.returncode != 0 and (tmp_path / "out" / "own-6.pt").is_file(), killed.stderr[-3000:]
    resumed = ranks("resume", tmp_path / "out")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    resumed_at = sorted(re.findall(r"RESUMED (\d) (\d+)", resumed.stdout))
    assert resumed_at == [("0", "6"), ("1", "6")], resumed.stdout
    restored = sorted((tmp_path / "out" / "restored" / "checkpoint-6").iterdir())
    assert {p.name for p in restored} >= {"rng_state_0.pth", "rng_state_1.pth", "pytorch_model.bin"}
    finals = sorted(re.findall(r"FINAL (\d) (\w+)", resumed.stdout))
    assert finals == sorted(re.findall(r"FINAL (\d) (\w+)", full.stdout)) and len(finals) == 2, \
        resumed.stdout + full.stdout
