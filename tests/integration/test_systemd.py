"""Running under systemd: the notify protocol over a real datagram socket,
the config file, and journald level prefixes."""

import signal
import socket
import subprocess
import sys
import time

import pytest


def _listen(path_or_abstract: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + path_or_abstract[1:] if path_or_abstract.startswith("@") else path_or_abstract)
    s.settimeout(0.2)
    return s


def _collect(sock: socket.socket, seconds: float) -> list[dict]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        out.append(dict(line.split("=", 1) for line in msg.splitlines()))
        out[-1]["_t"] = time.monotonic()
    return out


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_ready_status_watchdog_stopping(start, tmp_path, abstract) -> None:
    address = f"@snapd-test-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify.sock")
    sock = _listen(address)
    # ping every 0.5 s: a gap past 1 s is a daemon systemd would kill (a shorter interval made a loaded
    # CI machine's scheduling, not the daemon, fail this test: a 0.46 s gap against 0.4)
    d = start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    msgs = _collect(sock, 2.5)
    ready = [m for m in msgs if m.get("READY") == "1"]
    assert ready and ready[0]["MAINPID"] == str(d.proc.pid) and "clients" in ready[0]["STATUS"]
    assert ready[0]["STATUS"].endswith("2 host buffers, 64 MiB")  # (the operator sees the memory they hold)
    beats = [m["_t"] for m in msgs if m.get("WATCHDOG") == "1"]
    assert len(beats) >= 4, msgs
    assert max(b - a for a, b in zip(beats, beats[1:])) < 1.0  # within the advertised interval
    d.proc.send_signal(signal.SIGTERM)
    msgs = _collect(sock, 1.0)
    stopping = [m for m in msgs if m.get("STOPPING") == "1"]
    assert stopping and int(stopping[0]["EXTEND_TIMEOUT_USEC"]) == 120_000_000
    assert d.proc.wait(30) == 0
    sock.close()


def test_check_config_good_and_bad(tmp_path) -> None:
    def check(text: str, *env: str) -> subprocess.CompletedProcess:
        (tmp_path / "snapd.toml").write_text(text)
        return subprocess.run(["env", *env, sys.executable, "-m", "snapd", "serve", "--config",
                               str(tmp_path / "snapd.toml"), "--check-config", "--encode-threads", "3"],
                              capture_output=True, text=True, timeout=30, cwd="/")
    good = check('root = "/srv/ckpt"\nhost_buffer_bytes = 134217728\ncodec = "lz4"\n', "SNAPD_CODEC=raw")
    assert good.returncode == 0, good.stderr
    assert 'root = "/srv/ckpt"' in good.stdout and "host_buffer_bytes = 134217728" in good.stdout
    # env > file, flag > default
    assert 'codec = "raw"' in good.stdout and "encode_threads = 3" in good.stdout
    users = check('allowed_users = ["0", "root"]\nuser_dirs = "on"\n', "SNAPD_ALLOWED_GROUPS=0")
    assert users.returncode == 0, users.stderr
    assert 'allowed_users = ["0", "root"]' in users.stdout and 'allowed_groups = ["0"]' in users.stdout
    assert "per-user directories on" in users.stdout
    for text, named in [('host_bufer_bytes = 5\n', "unknown setting 'host_bufer_bytes'"),
                        ('host_buffers = 1\n', "host_buffers must be at least 2"),
                        ('codec = 3\n', "codec = 3 has the wrong type"),
                        ('endpoint = "tcp://0.0.0.0:1"\n', "only on ipc://"),
                        ('root = \n', "not valid TOML"),
                        ('socket_group = "no-such-group-xyz"\n', "no group 'no-such-group-xyz'"),
                        ('allowed_users = ["no-such-user-xyz"]\n', "no user 'no-such-user-xyz'"),
                        ('allowed_users = "alice"\n', "allowed_users must be a list"),
                        ('host_buffer_bytes = 67108864\nclient_buffer_bytes = 1048576\n',
                         "less than one host buffer"),
                        ('user_dirs = "maybe"\n', "user_dirs must be auto, on or off")]:
        out = check(text)
        assert out.returncode == 2 and named in out.stderr, (text, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def test_journald_level_prefixes(start) -> None:
    d = start(env={"JOURNAL_STREAM": "8:12345"})
    d.stop()
    lines = [line for line in d.log_text().splitlines() if line.startswith("<")]
    assert any(line.startswith("<6>snapd.daemon.serve: serving") for line in lines), d.log_text()
