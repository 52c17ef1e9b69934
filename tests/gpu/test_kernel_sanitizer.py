"""The segment kernel under NVIDIA's compute-sanitizer, on the device: no access outside an
allocation or misaligned (memcheck), no shared-memory race between a warp's lanes (racecheck: the
warp tiles move bytes between lanes through shared memory, ordered only by ``__syncwarp``), no
barrier misuse (synccheck). Skipped without CUDA or without compute-sanitizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).with_name("sanitize_kernels.py")


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for home in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")):
        if found is None and Path(home, "bin", "compute-sanitizer").exists():
            found = str(Path(home, "bin", "compute-sanitizer"))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_segment_kernel_is_clean_under_compute_sanitizer(tool) -> None:
    exe = sanitizer()
    if exe is None:
        pytest.skip("no compute-sanitizer (CUDA toolkit) on this machine")
    r = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, str(SCRIPT)],
                       capture_output=True, text=True, timeout=280)
    out = r.stdout + r.stderr
    if "Device not supported" in out:
        pytest.skip(f"compute-sanitizer does not support this device here: {out[-300:]}")
    assert r.returncode == 0, f"{tool}, exit {r.returncode}:\n{out[-6000:]}"
    assert "0 wrong of the cases above" in out, out[-3000:]
