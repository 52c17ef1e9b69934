"""Starting a private daemon when none answers (``connect(spawn=True)``).

The daemon runs ``python -m snapd serve`` in its own session, so a crashed
or killed trainer does not take it down before it has persisted what it
holds; it exits by itself once it has had no clients and no work for a while.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from snapd.client.connection import probe
from snapd.errors import DaemonUnavailable
from snapd.paths import socket_path

log = logging.getLogger(__name__)

IDLE_EXIT_S = 60.0


def spawn_daemon(endpoint: str, root: Path, timeout_s: float, host_buffer_bytes: int | None = None) -> int:
    """Start a private daemon and wait until it answers; return its pid (0: another process's
    daemon, started at the same moment, answers there instead)."""
    sock = socket_path(endpoint)
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = sock.parent / "snapd-private.log"
    cmd = [sys.executable, "-m", "snapd", "serve", "--endpoint", endpoint, "--root", str(root),
           "--exit-when-idle-s", str(IDLE_EXIT_S)]
    if host_buffer_bytes:
        cmd += ["--host-buffer-bytes", str(host_buffer_bytes)]
    with open(log_path, "ab") as logf:
        start = logf.seek(0, os.SEEK_END)  # (what this daemon and those spawned with it write)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd="/",
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + max(timeout_s, 30.0)
    lost = False  # the ranks of a job on one node spawn at once: one daemon wins, the others use it
    while time.monotonic() < deadline:
        if not lost and proc.poll() is not None:
            since = written_since(log_path, start)
            lost = f"already serves {endpoint}" in since
            if not lost:
                raise DaemonUnavailable(f"the private daemon exited with status {proc.returncode}: "
                                        + " | ".join(since.splitlines()[-5:]))
        if probe(endpoint, 0.2) is not None:
            if lost:
                log.info("another process's private snapd answers at %s: using it", endpoint)
                return 0
            log.info("spawned a private snapd (pid %d) at %s; its log: %s", proc.pid, endpoint, log_path)
            return proc.pid
    if proc.poll() is None:
        proc.kill()
    raise DaemonUnavailable(f"the private daemon did not answer at {endpoint} within the timeout; see "
                            f"{log_path}")


def written_since(log_path: Path, start: int) -> str:
    """The log written since ``start``. The daemons spawned at once share the log, so the one that
    won keeps writing after a loser's line: a loser is told by any line since its start, not by the
    last few (under load, the winner's first snapshot pushed the line out of them, and a rank failed)."""
    with open(log_path, "rb") as f:
        f.seek(start)
        return f.read(1 << 20).decode(errors="replace")
