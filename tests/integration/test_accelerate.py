"""Accelerate's own loop through ``snapshot_state``/``restore_state`` (snapd.integrations.accelerate), a
real Accelerator on the CPU and a real daemon: a process SIGKILLed right after a snapshot was handed
over resumes from it with the state Accelerate's own ``save_state`` wrote of the same step, bit for
bit, and ends where an uninterrupted run ends (the dropout's random stream restored as well)."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "scripts" / "accelerate_job.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate")


def run(mode: str, endpoint: str, out: Path) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(JOB), mode, endpoint, str(out)], capture_output=True,
                          text=True, timeout=240, cwd=out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_accelerate_loop_resumes_from_its_snapshot_and_ends_as_uninterrupted(tmp_path,
                                                                                       daemon) -> None:
    full = run("full", daemon.endpoint, tmp_path / "full")
    assert full.returncode == 0, full.stdout + full.stderr[-3000:]
    killed = run("killed", daemon.endpoint, tmp_path / "out")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr[-3000:]
    resumed = run("resume", daemon.endpoint, tmp_path / "out")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    assert "EQUAL" in resumed.stdout and re.findall(r"RESUMED (\d+)", resumed.stdout) == ["6"], resumed.stdout
    assert re.findall(r"FINAL (\w+)", resumed.stdout) == re.findall(r"FINAL (\w+)", full.stdout), \
        resumed.stdout + full.stdout
