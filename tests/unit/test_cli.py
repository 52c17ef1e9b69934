"""The offline CLI as a user runs it: a real subprocess, exit codes, one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file as load_torch

import snapd.client as snapd


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapd", *args], capture_output=True, text=True, cwd="/",
                          timeout=60)


@pytest.fixture
def job(root):
    for step in (10, 20):
        # (model.w differs by step: the snapshots share no data file, so damage to one leaves the other)
        snapd.save(root, "train", {"model": {"w": np.arange(40000, dtype=np.float32) + step - 20,
                                             "b": np.ones(3)},
                                   "bf": torch.arange(8, dtype=torch.bfloat16), "step": step},
                   step=step, metrics={"loss": 1.0 / step}, best=("loss", "min"))
    return root / "train"


def test_ls_and_inspect(job) -> None:
    out = run("ls", str(job.parent))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["JOB", "STEP", "TIME"] and len(lines) == 3
    assert "latest,best" in lines[2] and "loss=0.05" in lines[2]
    out = run("inspect", str(job / "step-000000000020"))
    assert out.returncode == 0, out.stderr
    assert "model.w" in out.stdout and "float32" in out.stdout and "40000" in out.stdout \
            and "bfloat16" in out.stdout


def test_verify_clean_then_damaged(job) -> None:
    assert run("verify", str(job)).returncode == 0
    data = job / "step-000000000010" / "data-00000-of-00001.bin"
    b = bytearray(data.read_bytes())
    b[200] ^= 1
    data.write_bytes(b)
    out = run("verify", str(job))
    assert out.returncode == 1
    assert "BAD" in out.stdout and "model.w chunk 0" in out.stdout and "checksum mismatch" in out.stdout
    assert "ok  " in out.stdout  # the other snapshot is still fine


def test_export_loads_with_safetensors(job, tmp_path) -> None:
    out = run("export", str(job / "step-000000000020"), str(tmp_path / "m.safetensors"), "--keys", "model.")
    assert out.returncode == 0, out.stderr
    got = load_np(tmp_path / "m.safetensors")
    assert set(got) == {"model.w", "model.b"}
    np.testing.assert_array_equal(got["model.w"], np.arange(40000, dtype=np.float32))
    assert run("export", str(job / "step-000000000020"), str(tmp_path / "all.safetensors")).returncode == 0
    assert torch.equal(load_torch(tmp_path / "all.safetensors")["bf"], torch.arange(8, dtype=torch.bfloat16))


@pytest.mark.parametrize("args", [
    ["verify", "/no/such/path"], ["inspect", "/no/such/dir"], ["ls", "/no/such/root"],
    ["export", "/no/such/dir", "/tmp/x.safetensors"], ["frobnicate"], ["inspect"],
    ["ls", "/tmp", "../etc"],
])
def test_bad_paths_and_arguments_exit_2_in_one_line(args) -> None:
    out = run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("snapd: error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_root_with_per_user_directories_lists_and_verifies_every_users_jobs(root) -> None:
    """A daemon serving several users keeps each one's jobs in ROOT/<user>/<job>: ``ls`` and ``verify``
    of the root show them as user/job (as the remote tier names them), beside jobs right under it."""
    snapd.save(root / "alice", "run", {"w": np.ones(4)}, step=3)
    snapd.save(root / "bob", "run", {"w": np.ones(4)}, step=5)
    snapd.save(root, "flat", {"w": np.ones(4)}, step=1)
    (root / "carol").mkdir()  # a user with no job yet
    out = run("ls", str(root))
    assert out.returncode == 0, out.stderr
    assert [line.split()[:2] for line in out.stdout.splitlines()[1:]] == \
        [["alice/run", "3"], ["bob/run", "5"], ["flat", "1"]]
    one = run("ls", str(root), "bob/run")
    assert one.returncode == 0
    assert [line.split()[:2] for line in one.stdout.splitlines()[1:]] == [["bob/run", "5"]]
    checked = run("verify", str(root))
    assert checked.returncode == 0 and checked.stdout.count("ok  ") == 3, checked.stdout + checked.stderr
    told = run("inspect", str(root))  # a root, not a snapshot: its jobs are named
    assert told.returncode == 2 and "name one of its jobs (alice/run, bob/run, flat)" in told.stderr
    for bad in ("alice/../flat", "../x/run", "a/b/c"):
        out = run("ls", str(root), bad)
        assert out.returncode == 2 and repr(bad) in out.stderr, (bad, out.stderr)


def test_export_missing_key_exits_2(job, tmp_path) -> None:
    out = run("export", str(job / "step-000000000020"), str(tmp_path / "x.safetensors"), "--keys", "nope")
    assert out.returncode == 2 and "'nope'" in out.stderr and not (tmp_path / "x.safetensors").exists()


def test_the_cli_explains_itself(tmp_path) -> None:
    import numpy as np

    import snapd.client as snapd

    out = run()
    assert out.returncode == 2 and "verify" in out.stdout and "serve" in out.stdout  # usage and the commands
    assert run("-V").stdout.startswith("snapd ")
    for job in ("a", "b"):
        for step in (1, 2):
            snapd.save(tmp_path, job, {"w": np.full(3, step)}, step=step)
    out = run("verify", str(tmp_path))  # a whole root: every job, each index too
    assert out.returncode == 0 and out.stdout.count("ok ") == 4, out.stdout
    out = run("inspect", str(tmp_path / "a"))  # a job: its latest snapshot
    assert out.returncode == 0 and "step 2 of job a" in out.stdout and "step-000000000002" in out.stderr
    f = tmp_path / "file"
    f.write_text("x")
    for args in (("verify", str(f)), ("inspect", str(f))):
        out = run(*args)
        assert out.returncode == 2 and "is a file" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run("serve", "--root", str(f), "--endpoint", f"ipc://{tmp_path}/s.sock")
    assert out.returncode == 2 and "is a file, not a directory" in out.stderr, out.stderr
