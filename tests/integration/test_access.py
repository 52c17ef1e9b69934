"""Who may connect, and what they may touch: socket permissions, SO_PEERCRED
through ZAP, refused uids, per-user directories, per-client limits.

Clients under another uid are real processes that import everything as
root and then drop to that uid before connecting (so the interpreter, which
may live under /root, is already loaded). Those tests need root and are
skipped without it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import zmq

from snapd.client.connection import Connection
from snapd.daemon.access import AccessPolicy, Peer, ZapHandler
from snapd.daemon.config import DaemonConfig
from snapd.errors import Busy

NOBODY, OTHER, NOGROUP = 65534, 65533, 65534  # OTHER has no passwd entry: its directory is named "65533"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a client under another uid needs root")

PREAMBLE = """
import os, sys, json
import numpy as np
import zmq, zmq.utils.monitor
import lz4.frame, zstandard, xxhash
import snapd.posix_acl, snapd.format.restore, snapd.format.codecs, snapd.client.local, snapd.cli
import snapd.format.retention
from snapd.client.hello import connect
from snapd.errors import PermissionDenied
uid, gid = int(sys.argv[1]), int(sys.argv[2])
if uid != os.geteuid():
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
"""


def as_user(uid: int, gid: int, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = PREAMBLE + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, str(uid), str(gid), *args], capture_output=True,
                          text=True, cwd="/", timeout=timeout)


def _traversable(path: Path) -> bool:
    """Whether every directory from / down to ``path`` lets other uids through (o+x)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


@pytest.fixture
def shared_dir():
    """A directory other uids can traverse (pytest's tmp_path is 0700 under /tmp/pytest-of-root, and
    some machines make /tmp itself 0700): the first of /tmp, /var/tmp, /dev/shm that they can reach."""
    base = next((b for b in map(Path, ("/tmp", "/var/tmp", "/dev/shm")) if b.is_dir() and _traversable(b)),
                None)
    if base is None:
        pytest.skip("no temporary directory that other uids can traverse")
    d = Path(tempfile.mkdtemp(prefix="snapd-access-", dir=base))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def multi_user(shared_dir, start):
    """A daemon whose socket group is nogroup, allowing nobody (65534) and no group as such."""
    (shared_dir / "snapd.toml").write_text(f'socket_group = "{NOGROUP}"\nallowed_users = ["{NOBODY}"]\n'
                                           'allowed_groups = []\nclient_max_in_flight = 1\n')
    return start("--config", str(shared_dir / "snapd.toml"), root=shared_dir / "root",
                 endpoint=f"ipc://{shared_dir}/run/s.sock")


def test_zap_sees_peer_credentials_from_so_peercred(tmp_path) -> None:
    """libzmq hands the ZAP handler localhost:<uid>:<gid>:<pid> for ipc peers; the same arrives with
    messages."""
    config = DaemonConfig(root=tmp_path, endpoint=f"ipc://{tmp_path}/z.sock", host_buffer_bytes=1 << 20)
    ctx = zmq.Context()
    zap = ZapHandler(ctx, AccessPolicy(config))
    srv = ctx.socket(zmq.ROUTER)
    ZapHandler.protect(srv)
    srv.bind(config.endpoint)
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time, zmq; s = zmq.Context().socket(zmq.DEALER); "
                             "s.connect(sys.argv[1]); s.send(b'hi'); time.sleep(5)", config.endpoint])
    try:
        assert zap.sock.poll(10_000), "libzmq sent no ZAP request for an ipc peer"
        zap.handle()
        assert srv.poll(10_000)
        frames = srv.recv_multipart(copy=False)
        peer = Peer.from_address(frames[1].get("Peer-Address"))
        assert (peer.uid, peer.gid, peer.pid) == (os.geteuid(), os.getegid(), proc.pid)
        # what our handler answered, from the same address
        assert frames[1].get("User-Id") == str(os.geteuid())
    finally:
        proc.kill()
        proc.wait()
        srv.close(0), zap.close(), ctx.term()


@as_root
def test_socket_permissions_follow_the_socket_group(multi_user) -> None:
    sock = Path(multi_user.endpoint[len("ipc://"):])
    d, s = sock.parent.stat(), sock.stat()
    assert (stat.S_IMODE(d.st_mode), d.st_gid) == (0o750, NOGROUP)  # clients may enter, never write
    assert (stat.S_IMODE(s.st_mode), s.st_gid) == (0o660, NOGROUP)
    assert stat.S_IMODE(Path(f"{sock}.lock").stat().st_mode) == 0o600


@as_root
def test_disallowed_uid_refused_clearly_and_the_daemon_keeps_serving(multi_user) -> None:
    # OTHER reaches the socket (its primary group is the socket group) but no setting allows it
    out = as_user(OTHER, NOGROUP, """
        try:
            connect("j", endpoint=sys.argv[3], spawn=True, timeout_s=5)
        except PermissionDenied as e:
            print("REFUSED", e)
        """, multi_user.endpoint)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and f"uid {OTHER}" in out.stdout \
            and "allowed_users" in out.stdout, out.stdout
    assert f"refused uid {OTHER}" in multi_user.log_text()
    assert not (multi_user.root / "j").exists() and not (multi_user.root / str(OTHER)).exists()
    for uid in (NOBODY, 0):  # the allowed user and root are served as before
        ok = as_user(uid, NOGROUP, """
            with connect("j", endpoint=sys.argv[3], spawn=False, timeout_s=5) as c:
                print("OK", c.snapshot({"w": np.arange(10.0)}, step=1).wait(30).path)
            """, multi_user.endpoint)
        assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


@as_root
def test_each_user_has_its_own_directory_and_cannot_read_anothers(multi_user) -> None:
    save_and_restore = """
        value = float(sys.argv[4])
        with connect("same-name", endpoint=sys.argv[3], spawn=False, timeout_s=5) as c:
            for step in (1, 2):  # the second grant reuses the buffer this uid already holds
                c.snapshot({"w": np.full(1000, value + step)}, step=step).wait(30)
            print(json.dumps({"root": str(c.root), "restored": float(c.restore()["w"][0]),
                              "steps": [s.step for s in c.list()]}))
        """
    mine = as_user(NOBODY, NOGROUP, save_and_restore, multi_user.endpoint, "10")
    assert mine.returncode == 0, mine.stderr
    got = __import__("json").loads(mine.stdout)
    assert got == {"root": str(multi_user.root / "nobody"), "restored": 12.0, "steps": [1, 2]}
    # root's job of the same name is elsewhere and untouched by nobody's
    root_out = as_user(0, 0, save_and_restore, multi_user.endpoint, "20")
    assert root_out.returncode == 0, root_out.stderr
    assert __import__("json").loads(root_out.stdout)["root"] == str(multi_user.root / "root")
    # another uid can neither list nor read nobody's snapshots
    peek = as_user(OTHER, NOGROUP, """
        for p in (sys.argv[3], sys.argv[3] + "/same-name"):
            try:
                os.listdir(p); print("READ", p)
            except PermissionError:
                print("DENIED", p)
        """, str(multi_user.root / "nobody"))
    assert peek.stdout.split().count("DENIED") == 2, peek.stdout + peek.stderr
    files = list((multi_user.root / "nobody" / "same-name").rglob("*"))
    assert files and all(f.stat().st_uid == 0 for f in files)  # the daemon wrote them; nobody only reads
    # snapd ls: the node's admin sees every user's jobs as user/job; a user, who may not list the root,
    # is told to name their own directory, and lists it
    ls = 'from snapd.cli import main; sys.exit(main(["ls", *sys.argv[3:]]))'
    admin = as_user(0, 0, ls, str(multi_user.root))
    assert admin.returncode == 0, admin.stderr
    assert [line.split()[:2] for line in admin.stdout.splitlines()[1:]] == [
        [f"{user}/same-name", str(step)] for user in ("nobody", "root") for step in (1, 2)]
    told = as_user(NOBODY, NOGROUP, ls, str(multi_user.root))
    assert told.returncode == 2 and f"{multi_user.root}/<user>" in told.stderr, told.stdout + told.stderr
    own = as_user(NOBODY, NOGROUP, ls, str(multi_user.root / "nobody"))
    assert own.returncode == 0 and own.stdout.count("same-name") == 2, own.stdout + own.stderr


@as_root
def test_buffer_passed_to_another_uid_gets_fresh_pages(tmp_path) -> None:
    from snapd.daemon.buffers import BufferPool

    pool = BufferPool(Path("/dev/shm"), 2, 1 << 20)
    try:
        first = pool.install(pool.make(0, 1 << 20, NOBODY))
        first.view[:4] = [1, 2, 3, 4]
        assert pool.replacement_size(first, NOBODY, 100, 1 << 20) is None
        assert pool.replacement_size(first, OTHER, 100, 1 << 20) == 1 << 20
        second = pool.install(pool.make(0, 1 << 20, OTHER))
        assert second.path != first.path and not first.path.exists() and pool.buffers[0] is second
        probe = "print([os.access(p, os.R_OK | os.W_OK) for p in sys.argv[3:]])"
        assert as_user(OTHER, NOGROUP, probe, str(second.path), str(pool.buffers[1].path)).stdout.strip() \
            == "[True, False]"
        assert as_user(NOBODY, NOGROUP, probe, str(second.path)).stdout.strip() == "[False]"
        assert not second.view[:4].any()
    finally:
        pool.close()


def test_per_client_in_flight_limit_waits_or_skips_without_blocking_others(start) -> None:
    d = start("--host-buffers", "3", env={"SNAPD_CLIENT_MAX_IN_FLIGHT": "1"})
    a, b = Connection(d.endpoint, 5), Connection(d.endpoint, 5)
    try:
        for conn, on_busy in ((a, "skip"), (b, "wait")):
            conn.call("hello", job="lim", pid=os.getpid(), on_busy=on_busy)
        first = a.call("acquire", nbytes=100, emergency=False)
        with pytest.raises(Busy, match="client_max_in_flight = 1"):
            a.call("acquire", nbytes=100, emergency=False)
        held = b.call("acquire", nbytes=100, emergency=False)  # another client is not held back by a's limit
        waiting = b.send("acquire", nbytes=100, emergency=False)
        assert b.take(waiting) is None and not b._pump(0.5)  # b waits at its own limit, a buffer being free
        b.call("release", lease=held["lease"])
        assert b.wait(waiting, 5)["type"] == "granted"  # ... until one of its own ends
        a.call("release", lease=first["lease"])
        assert a.call("acquire", nbytes=100, emergency=False)["type"] == "granted"
        assert a.call("status")["clients"][0]["held_buffers"] == 1
    finally:
        a.close(), b.close()


TRUNCATE_DURING_FLUSH = """
import time
from snapd.client import host_buffers
real_map = host_buffers.HostBuffers.mapping
paths = []
def mapping(self, path, *a, **kw):
    paths.append(path)
    return real_map(self, path, *a, **kw)
host_buffers.HostBuffers.mapping = mapping
state = {"w": np.random.default_rng(0).standard_normal(24 << 20).astype(np.float32)}  # 96 MiB
with connect("victim", endpoint=sys.argv[3], spawn=False, timeout_s=30) as c:
    p = c.snapshot(state, step=1)  # the daemon holds it now, and encodes it for a while
    time.sleep(float(sys.argv[4]))
    os.truncate(paths[-1], 4096)  # the buffer the daemon shares with this uid, cut mid-flush
    try:
        p.wait(timeout=120)
        print("PERSISTED")
    except Exception as e:
        print("FAILED", type(e).__name__, e)
"""


@as_root
@pytest.mark.parametrize("after_s", [0.0, 0.3])
def test_another_uid_truncating_a_shared_buffer_mid_flush_cannot_kill_the_daemon(shared_dir, start,
                                                                                  after_s) -> None:
    (shared_dir / "snapd.toml").write_text(f'socket_group = "{NOGROUP}"\nallowed_users = ["{NOBODY}"]\n'
                                           'allowed_groups = []\ncodec = "shuffle-zstd"\n')
    d = start("--config", str(shared_dir / "snapd.toml"), root=shared_dir / "root",
              endpoint=f"ipc://{shared_dir}/run/s.sock")
    import numpy as np
    import snapd.client as snapd
    mine = {"a": np.random.default_rng(1).standard_normal(8 << 20).astype(np.float32)}
    with snapd.connect("handed-over", endpoint=d.endpoint, spawn=False) as a:  # another user's, in flight
        pending = a.snapshot(mine, step=3)
        out = as_user(NOBODY, NOGROUP, TRUNCATE_DURING_FLUSH, d.endpoint, str(after_s), timeout=180)
        assert d.proc.poll() is None, f"the daemon died ({d.proc.returncode})\n{d.log_text()}"
        pending.wait(timeout=120)  # what was handed over before the attack still reaches disk
        assert np.array_equal(a.restore(3)["a"], mine["a"])
    assert "FAILED" in out.stdout or "PERSISTED" in out.stdout, out.stdout + out.stderr
    if "FAILED" in out.stdout:  # (a flush that ended before the cut persisted, as it should)
        assert "truncated" in out.stdout, out.stdout
    w = np.arange(1000, dtype=np.float32)
    with snapd.connect("after", endpoint=d.endpoint, spawn=False) as c:  # the daemon serves on
        c.snapshot({"w": w}, step=1).wait(timeout=60)
        assert np.array_equal(c.restore()["w"], w)


@as_root
def test_a_user_sees_only_their_own_jobs_in_status_and_no_other_users_buffers(multi_user) -> None:
    from snapd.client.connection import daemon_status

    secret = """
        with connect("root-secret-job", endpoint=sys.argv[3], spawn=False, timeout_s=5) as c:
            c.snapshot({"secret.tensor.name": np.arange(1 << 20, dtype=np.float32)}, step=7).wait(30)
            print("OK")
        """
    assert "OK" in as_user(0, 0, secret, multi_user.endpoint).stdout
    spy = as_user(NOBODY, NOGROUP, """
        from snapd.client.connection import Connection, daemon_status
        with connect("mine", endpoint=sys.argv[3], spawn=False, timeout_s=5) as c:
            c.snapshot({"w": np.arange(10.0)}, step=1).wait(30)
        conn = Connection(sys.argv[3], 5)
        welcome = conn.call("hello", job="mine", pid=os.getpid(), on_busy="wait")
        mapped = []
        for b in welcome["buffers"]:  # each buffer the daemon names must be one this uid may open
            try:
                os.close(os.open(b["path"], os.O_RDWR)); mapped.append(True)
            except PermissionError:
                mapped.append(False)
        print(json.dumps({"status": daemon_status(sys.argv[3]), "welcome": welcome, "mapped": mapped}))
        """, multi_user.endpoint)
    assert spy.returncode == 0, spy.stderr
    text = spy.stdout
    assert "root-secret-job" not in text and "secret.tensor.name" not in text, text
    seen = json.loads(text)
    assert {c["uid"] for c in seen["status"]["clients"]} <= {NOBODY}
    assert [j["job"] for j in seen["status"]["jobs"]] == ["mine"]
    assert list(seen["status"]["codecs"]) in ([], ["nobody/mine"])
    assert seen["status"]["counters"]["persisted"] >= 2  # figures summed over every user stay
    assert all(seen["mapped"]), seen["welcome"]["buffers"]
    listing = as_user(NOBODY, NOGROUP, """
        try:
            print("LISTED", os.listdir(sys.argv[3]))
        except PermissionError:
            print("DENIED")
        """, str(multi_user.root))
    assert listing.stdout.strip() == "DENIED", listing.stdout  # the root's listing names every user
    st = daemon_status(multi_user.endpoint)  # root sees everyone
    assert {"root-secret-job", "mine"} <= {j["job"] for j in st["jobs"]}
    # the codec choice is per user and job: root's "mine" is not nobody's
    as_user(0, 0, secret.replace("root-secret-job", "mine"), multi_user.endpoint)
    codecs = daemon_status(multi_user.endpoint)["codecs"]
    assert {"nobody/mine", "root/mine", "root/root-secret-job"} <= set(codecs), codecs


HOARDER = """
import time
from snapd.client.connection import Connection
conns = [Connection(sys.argv[3], 10) for _ in range(4)]  # one process, four connections, two buffers each
for c in conns:
    c.call("hello", job="hoard", pid=os.getpid(), on_busy="wait")
    for _ in range(2):
        c.send("acquire", nbytes=1 << 20, emergency=False)
time.sleep(2)
granted = 0
for c in conns:
    while c._pump(0.2):
        pass
    granted += sum(len(q) for q in c._replies.values())
print("GRANTED", granted, flush=True)
time.sleep(60)
"""


@as_root
def test_one_user_with_many_connections_cannot_take_every_buffer(shared_dir, start) -> None:
    """Per-client limits do not stop a user who opens more connections: the clients of one uid
    together hold at most user_buffer_bytes (by default half the buffers' memory, when other users
    may connect), and another user's snapshot goes through."""
    import numpy as np

    import snapd.client as snapd

    (shared_dir / "snapd.toml").write_text(f'socket_group = "{NOGROUP}"\nallowed_users = ["{NOBODY}"]\n'
                                           'allowed_groups = []\nbusy_wait_s = 5\n'
                                           f'max_host_memory_bytes = {8 * 32 << 20}\n')
    d = start("--config", str(shared_dir / "snapd.toml"), root=shared_dir / "root",
              endpoint=f"ipc://{shared_dir}/run/s.sock")
    hoarder = subprocess.Popen([sys.executable, "-c", PREAMBLE + HOARDER, str(NOBODY), str(NOGROUP),
                                d.endpoint],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        line = hoarder.stdout.readline()
        why = line + hoarder.stderr.read() if hoarder.poll() is not None else line
        assert line.strip() == "GRANTED 4", why
        w = np.arange(1 << 20, dtype=np.float32)
        with snapd.connect("victim", endpoint=d.endpoint, spawn=False) as c:  # another uid: root
            p = c.snapshot({"w": w}, step=1)
            assert not p.skipped, p.reason
            p.wait(timeout=60)
            assert np.array_equal(c.restore()["w"], w)
    finally:
        hoarder.kill()
        hoarder.wait()


@as_root
def test_a_user_outside_the_group_is_told_a_daemon_is_there_and_which_group_to_join(multi_user) -> None:
    out = as_user(OTHER, OTHER, """
        from snapd.client.connection import daemon_status
        for call in (lambda: connect("j", endpoint=sys.argv[3], spawn=True, timeout_s=3),
                     lambda: daemon_status(sys.argv[3], timeout_s=2)):
            try:
                call(); print("CONNECTED")
            except PermissionDenied as e:
                print("DENIED", e)
        """, multi_user.endpoint)
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("DENIED a snapd daemon listens at") for line in lines), \
        out.stdout + out.stderr
    assert all("usermod -aG nogroup" in line
               or f"usermod -aG {NOGROUP}" in line for line in lines), out.stdout
    assert not list((multi_user.root).glob("j"))  # and no private daemon was spawned in its place


def _serve(shared_dir: Path, endpoint: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapd", "serve", "--root", str(root), "--endpoint",
                           endpoint, "--host-buffer-bytes",
                           str(8 << 20)], capture_output=True, text=True, timeout=60, cwd="/")


@as_root
def test_the_daemon_refuses_paths_another_user_made_first(shared_dir) -> None:
    """Squatting: a socket directory, snapshot root or lock file made by someone else, or a
    directory others can write, is refused at start, naming it; nothing is written through them."""
    squat = shared_dir / "squat"
    squat.mkdir()
    os.chown(squat, NOBODY, NOGROUP)  # made by another user before the daemon first started
    out = _serve(shared_dir, f"ipc://{squat}/s.sock", shared_dir / "root")
    assert out.returncode != 0 and "belongs to uid 65534" in out.stderr \
            and "Traceback" not in out.stderr, out.stderr
    assert not list(squat.iterdir())

    open_dir = shared_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    out = _serve(shared_dir, f"ipc://{shared_dir}/run/s.sock", open_dir / "root")
    assert out.returncode != 0 and "other users can write" in out.stderr, out.stderr

    out = _serve(shared_dir, f"ipc://{shared_dir}/run2/s.sock", squat / "root")
    assert out.returncode != 0 and "belongs to uid 65534" in out.stderr, out.stderr

    run = shared_dir / "run3"
    run.mkdir(mode=0o755)
    victim = shared_dir / "victim"
    victim.write_text("keep me\n")
    (run / "s.sock.lock").symlink_to(victim)  # the lock file planted as a symlink
    out = _serve(shared_dir, f"ipc://{run}/s.sock", shared_dir / "root")
    assert out.returncode != 0 and "lock file" in out.stderr, out.stderr
    assert victim.read_text() == "keep me\n"


@as_root
def test_a_client_refuses_a_socket_another_user_put_there(shared_dir) -> None:
    """A fake daemon's socket, owned by another user: no tensor goes to it."""
    import numpy as np

    import snapd.client as snapd
    from snapd.errors import PermissionDenied

    run = shared_dir / "run"
    run.mkdir()
    run.chmod(0o777)
    fake = as_user(NOBODY, NOGROUP, """
        import socket, time
        s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[3]); s.listen(); print("BOUND", flush=True)
        """, str(run / "s.sock"))
    assert "BOUND" in fake.stdout, fake.stderr
    with pytest.raises(PermissionDenied, match="belongs to uid 65534"):
        with snapd.connect("j", endpoint=f"ipc://{run}/s.sock", spawn=True) as c:
            c.snapshot({"w": np.ones(4)}, step=1)


@as_root
def test_a_user_cannot_fill_the_disk_for_the_others(shared_dir, start) -> None:
    """Every file is the daemon's, so a filesystem quota on a user cannot apply: user_disk_bytes
    refuses the snapshot that would pass it, before any byte is copied, and the others go on."""
    import numpy as np

    import snapd.client as snapd

    (shared_dir / "snapd.toml").write_text(f'socket_group = "{NOGROUP}"\nallowed_users = ["{NOBODY}"]\n'
                                           f'allowed_groups = []\nuser_disk_bytes = {3 << 20}\ncodec = '
                                           '"raw"\n')
    d = start("--config", str(shared_dir / "snapd.toml"), root=shared_dir / "root",
              endpoint=f"ipc://{shared_dir}/run/s.sock")
    out = as_user(NOBODY, NOGROUP, """
        from snapd.errors import LimitExceeded
        with connect("fill", endpoint=sys.argv[3], spawn=False, keep_last=None, timeout_s=10) as c:
            for step in range(1, 6):
                try:
                    c.snapshot({"w": np.full(1 << 18, step, np.float32)}, step=step).wait(30)  # 1 MiB each
                    print("SAVED", step, flush=True)
                except LimitExceeded as e:
                    print("REFUSED", step, e, flush=True)
            print("ON DISK", [s.step for s in c.list()], float(c.restore(2)["w"][0]))
            try:  # the files are the daemon's: this user may read them, not delete them
                snapd.format.retention.remove_step(snapd.format.JobDir(c.root, "fill"), 1)
            except PermissionError:
                print("NOT WRITABLE")
        """, d.endpoint)
    lines = out.stdout.splitlines()
    assert lines[:2] == ["SAVED 1", "SAVED 2"], out.stdout + out.stderr
    assert all(line.startswith("REFUSED") and "user_disk_bytes = 3145728" in line
               and "snapd rm JOB STEP" in line for line in lines[2:5]), out.stdout
    assert lines[5:] == ["ON DISK [1, 2] 2.0", "NOT WRITABLE"], out.stdout  # nothing on disk was lost
    # ... so the user removes a snapshot through the daemon (snapd rm), and snapshots on within the quota
    rm = as_user(NOBODY, NOGROUP, 'from snapd.cli import main; sys.exit(main(["rm", *sys.argv[3:]]))',
                 "fill", "1", "--endpoint", d.endpoint)
    assert rm.returncode == 0 and rm.stdout == "removed fill step 1\n", rm.stdout + rm.stderr
    again = as_user(NOBODY, NOGROUP, """
        with connect("fill", endpoint=sys.argv[3], spawn=False, keep_last=None, timeout_s=10) as c:
            c.snapshot({"w": np.full(1 << 18, 6, np.float32)}, step=6).wait(30)
            print([s.step for s in c.list()], float(c.restore()["w"][0]))
        """, d.endpoint)
    assert again.stdout == "[2, 6] 6.0\n", again.stdout + again.stderr
    w = np.arange(1 << 16, dtype=np.float32)
    with snapd.connect("other", endpoint=d.endpoint, spawn=False) as c:  # root's quota is its own
        c.snapshot({"w": w}, step=1).wait(timeout=60)
        assert np.array_equal(c.restore()["w"], w)
