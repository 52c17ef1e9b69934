"""The Hugging Face Trainer through ``SnapdCallback`` (snapd.integrations.hf), a tiny GPT-2 built from a
config and a real daemon: the Trainer's own save is replaced at its save steps; a trainer killed
right after a snapshot was handed over resumes from it (``checkpoint_dir``) with its state equal
to the framework's own serialization of it, and ends bit for bit where an uninterrupted run ends.
(transformers runs in subprocesses, from outside snapd's clone: see scripts/hf_job.py.)"""

from __future__ import annotations

import importlib.util
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
    assert "EQUAL" in resumed.stdout and re.findall(r"RESUMED (\d+)", resumed.stdout) == ["6"], resumed.stdout
    assert re.findall(r"FINAL (\w+)", resumed.stdout) == re.findall(r"FINAL (\w+)", full.stdout), \
        resumed.stdout + full.stdout
    assert [s.step for s in catalog.list_snapshots(daemon.root, "hf")] == [3, 6, 9]
