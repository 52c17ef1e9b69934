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
