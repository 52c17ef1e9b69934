"""The README's main job works: `snapd demo` trains, is killed, resumes."""

import subprocess
import sys


def test_demo_resumes_after_sigkill(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "snapd", "demo", "--root", str(tmp_path), "--steps", "60",
                          "--every", "10", "--die-at", "35", "--hidden", "256"],
                         capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "killed with SIGKILL" in out.stdout and "resumed from step 30" in out.stdout
    assert out.stdout.strip().endswith("demo OK")


def test_demo_removes_its_temporary_root_and_shows_the_step_beside_each_loss() -> None:
    import re
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "snapd", "demo", "--steps", "40", "--every", "10",
                          "--die-at", "25",
                          "--hidden", "128"], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("demo OK"), out.stdout + out.stderr
    removed = re.search(r"^removed (\S+) ", out.stdout, re.M)
    assert removed and not Path(removed.group(1)).exists(), out.stdout
    assert "loss at step 20:" in out.stdout and "loss at step 21:" in out.stdout, out.stdout
