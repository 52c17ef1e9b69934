"""The daemon and its trainers in different pid and mount namespaces, as containers put them
(issue 28; made with ``unshare``, the trainer seeing of the daemon's files only the socket
directory, the snapshot root and /dev/shm): a trainer whose pid the daemon sees as another number, or not
at all (0), still snapshots, shares its tensors, restores, and a uid the daemon does not allow is
still refused by the kernel's word. Needs root (unshare, other uids)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

NOBODY, OTHER, NOGROUP = 65534, 65533, 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="namespaces and other uids need root and unshare")
# a new pid namespace (and mount namespace); the process in it dies with unshare (a test's teardown)
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]

TRAINER = """
import os, sys
import numpy, torch, zmq, zmq.utils.monitor, lz4.frame, zstandard, xxhash  # (before the uid drops:
import snapd.client.local, snapd.format.restore, snapd.client.registered     # the interpreter's files
import snapd.posix_acl                                                        # are root's)
from snapd.client import connect
from snapd.errors import PermissionDenied
uid, gid = int(sys.argv[1]), int(sys.argv[2])
if uid != os.geteuid():
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
print("PID", os.getpid(), flush=True)
try:
    c = connect("box", endpoint=sys.argv[3], spawn=False, timeout_s=10)
except PermissionDenied as e:
    print("REFUSED", e)
    sys.exit(0)
w = torch.arange(1000, dtype=torch.float32)
print("PLAIN", c.snapshot({"w": w}, step=1).wait(30).step)
c.share({"w": w})  # the registered path: a region in /dev/shm named for the pid it knows itself by
w += 1
print("SHARED", c.snapshot({"w": w}, step=2).wait(30).step)
print("RESTORED", float(c.restore()["w"].sum()))
c.close()
"""


@pytest.fixture
def shared_dir():
    """A directory other uids can traverse (pytest's own is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="snapd-ns-", dir="/tmp"))
    d.chmod(0o755)
    (d / "snapd.toml").write_text(f'socket_group = "{NOGROUP}"\nallowed_users = ["{NOBODY}"]\n'
                                  'allowed_groups = []\n')
    yield d
    shutil.rmtree(d, ignore_errors=True)


# In the trainer's mount namespace the daemon's directory is a fresh tmpfs, so it sees of the
# daemon's files only what a container would be given: the socket directory and the snapshot root,
# bind-mounted back at their paths (held meanwhile under /var/tmp), and /dev/shm.
CONTAINER = """
set -e
hold=$1; shared=$2; shift 2
mount --bind "$shared" "$hold"
mount -t tmpfs tmpfs "$shared"
mkdir -p "$shared/run" "$shared/root"
mount --bind "$hold/run" "$shared/run"
mount --bind "$hold/root" "$shared/root"
test ! -e "$shared/snapd.toml"  # (the rest of the daemon's directory is not there)
exec "$@"
"""


def trainer(uid: int, endpoint: str) -> subprocess.CompletedProcess:
    shared = Path(endpoint[len("ipc://"):]).parent.parent
    hold = Path(tempfile.mkdtemp(prefix="snapd-hold-", dir="/var/tmp"))
    try:
        inside = [sys.executable, "-c", textwrap.dedent(TRAINER), str(uid), str(NOGROUP), endpoint]
        return subprocess.run([*UNSHARE, "bash", "-c", CONTAINER, "container", str(hold), str(shared),
                               *inside], capture_output=True, text=True, cwd="/", timeout=120)
    finally:
        hold.rmdir()


def test_a_trainer_in_its_own_pid_namespace_snapshots_shares_and_restores(shared_dir, start) -> None:
    d = start("--config", str(shared_dir / "snapd.toml"), root=shared_dir / "root",
              endpoint=f"ipc://{shared_dir}/run/s.sock")
    out = trainer(NOBODY, d.endpoint)
    assert out.returncode == 0, out.stderr[-3000:]
    want = ["PID 1", "PLAIN 1", "SHARED 2", f"RESTORED {sum(range(1, 1001))}.0"]
    assert out.stdout.split("\n")[:4] == want, (out.stdout, out.stderr[-2000:])
    # the daemon went by the kernel's pid for it (its liveness, its buffers), not the pid 1 it claimed
    assert "client says pid 1, the kernel says" in d.log_text()
    # and a uid it does not allow is refused the same across the namespace
    refused = trainer(OTHER, d.endpoint)
    assert "REFUSED" in refused.stdout and f"uid {OTHER}" in refused.stdout, (refused.stdout, refused.stderr)
    assert f"refused uid {OTHER}" in d.log_text()


def test_a_daemon_that_cannot_see_the_trainers_pid_serves_it_and_says_why(shared_dir, start) -> None:
    # the daemon in a pid namespace of its own, the trainer in another: the kernel reports pid 0
    d = start("--config", str(shared_dir / "snapd.toml"), root=shared_dir / "root",
              endpoint=f"ipc://{shared_dir}/run/s.sock", command=[*UNSHARE, sys.executable, "-m", "snapd"])
    out = trainer(NOBODY, d.endpoint)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARED 2" in out.stdout and f"RESTORED {sum(range(1, 1001))}.0" in out.stdout, out.stdout
    assert "runs in a pid namespace this daemon cannot see" in d.log_text() and "hostPID" in d.log_text()


def test_a_daemon_in_another_pid_namespace_leaves_live_buffers_and_regions_alone(shared_dir, start) -> None:
    # a daemon and a trainer that shares its tensors, live, in the host's pid namespace ...
    a = start(root=shared_dir / "a", endpoint=f"ipc://{shared_dir}/a.sock")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time, torch, snapd.client as snapd
        c = snapd.connect("held", endpoint=sys.argv[1], spawn=False)
        w = torch.ones(1000)
        c.share({"w": w})
        print("READY", c._regions[0].path, flush=True)
        sys.stdin.read()
        print("SNAPSHOT", c.snapshot({"w": w}, step=1).wait(30).step, flush=True)
        """), a.endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        line = holder.stdout.readline().split()
        assert line[:1] == ["READY"], line
        region = Path(line[1])
        buffers = sorted(Path("/dev/shm").glob(f"snapd-{a.proc.pid}-*"))
        assert buffers and region.exists()
        # ... and a second daemon started in a pid namespace of its own, which sees neither pid: its
        # sweep of dead processes' files must take them for alive (they hold their locks)
        b = start(root=shared_dir / "b", endpoint=f"ipc://{shared_dir}/b.sock", name="b",
                  command=[*UNSHARE, sys.executable, "-m", "snapd"])
        # (it may take up what killed pid-1 daemons left: those lock nothing)
        assert not any(str(p) in b.log_text() for p in [region, *buffers]), b.log_text()
        assert region.exists() and all(p.exists() for p in buffers)
        holder.stdin.close()
        assert holder.stdout.readline().split() == ["SNAPSHOT", "1"]
    finally:
        holder.kill()
        holder.wait()


def test_a_daemon_that_is_pid_1_takes_up_the_buffers_a_killed_pid_1_left(shared_dir, start) -> None:
    # (in a container the daemon is pid 1, and pid 1 is always alive: its name alone never said gone)
    before = set(Path("/dev/shm").glob("snapd-1-*"))
    a = start(root=shared_dir / "a", endpoint=f"ipc://{shared_dir}/a.sock", name="a",
              command=[*UNSHARE, sys.executable, "-m", "snapd"])
    left = set(Path("/dev/shm").glob("snapd-1-*")) - before
    assert left, a.log_text()  # (its host buffers)
    a.proc.kill()  # (unshare's --kill-child: the daemon is killed, its buffers stay)
    a.proc.wait()
    a.wait_for(lambda: not any(_locked(p) for p in left))  # (its pid 1 dies just after unshare)
    assert all(p.exists() for p in left)
    b = start(root=shared_dir / "b", endpoint=f"ipc://{shared_dir}/b.sock", name="b",
              command=[*UNSHARE, sys.executable, "-m", "snapd"])
    assert not any(p.exists() for p in left), b.log_text()
    assert all(f"removed a dead daemon's host buffer {p}" in b.log_text() for p in left)
    # and its own, live, are left alone by a third one (they hold their locks)
    mine = set(Path("/dev/shm").glob("snapd-1-*"))
    c = start(root=shared_dir / "c", endpoint=f"ipc://{shared_dir}/c.sock", name="c",
              command=[*UNSHARE, sys.executable, "-m", "snapd"])
    assert all(p.exists() for p in mine) and not any(str(p) in c.log_text() for p in mine), c.log_text()
    for d in (b, c):  # (killed as a.proc was: their buffers would stay in /dev/shm until a daemon starts)
        d.proc.kill()
        d.proc.wait()
    ours = set(Path("/dev/shm").glob("snapd-1-*")) - before
    b.wait_for(lambda: not any(_locked(p) for p in ours if p.exists()))
    for p in ours:
        p.unlink(missing_ok=True)


def _locked(path: Path) -> bool:
    """Whether a live process holds the file's flock (a daemon's buffer, while it lives)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
