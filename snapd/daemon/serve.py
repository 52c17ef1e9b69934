"""``snapd serve``: run the daemon in the foreground until SIGTERM/SIGINT.

A lock file beside the socket (flock, held for the daemon's life) makes a
second daemon on the same endpoint refuse to start instead of silently
stealing the socket; a socket file left by a killed daemon is replaced.
SIGTERM, SIGINT and SIGHUP become the same "stop" a drain would need: no new
snapshots but emergency ones, persist those already copied (up to ``drain_timeout_s``), exit 0
(snapd.daemon.shutdown). SIGUSR1 and SIGUSR2 are logged and change nothing: Slurm's ``--signal``
warning reaches a daemon that runs inside the allocation too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from types import FrameType

from snapd.daemon.access import AccessPolicy
from snapd.daemon.config import DaemonConfig
from snapd.paths import socket_path
from snapd.errors import InvalidArgument
from snapd.format.root_jobs import clean_root
from snapd.ownership import check_owned_dir, open_lock

log = logging.getLogger(__name__)


class AlreadyServing(InvalidArgument):
    code = "already_serving"


def take_endpoint(config: DaemonConfig, policy: AccessPolicy) -> int:
    """Lock the endpoint for this process; return the lock's fd (kept open while serving)."""
    sock = socket_path(config.endpoint)
    try:
        policy.prepare_socket_dir(sock.parent)
    except OSError as e:
        raise InvalidArgument(f"cannot create the socket directory {sock.parent}: {e.strerror}") from None
    check_owned_dir(sock.parent, "socket directory")  # (snapd.ownership: nobody squats on it)
    fd = open_lock(Path(f"{sock}.lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyServing(f"another snapd (pid {holder}) already serves {config.endpoint}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if sock.exists():
        log.info("replacing the socket of a daemon that is gone: %s", sock)
        sock.unlink()
    return fd


def raise_open_files(want: int = 65536) -> None:
    """Each client, peer link and open snapshot file takes a descriptor: the soft limit (1024 under
    systemd, for programs that still use select()) goes up to the hard one, at most ``want``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("open files stay at most %d (%s): many peers or clients may exhaust them", soft, e)


def serve(config: DaemonConfig) -> int:
    from snapd.daemon.server import Server  # ZeroMQ is loaded only when serving
    from snapd.daemon.leftovers import remove_dead_regions

    policy = AccessPolicy(config)
    if config.root.exists() and not config.root.is_dir():
        raise InvalidArgument(f"snapshot root {config.root} is a file, not a directory")
    try:
        config.root.mkdir(parents=True, exist_ok=True)
        check_owned_dir(config.root, "snapshot root", group_above=True)
        probe = config.root / f".snapd-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InvalidArgument(f"snapshot root {config.root} is not writable: {e.strerror}") from None
    from snapd.kernels import select_backend

    try:
        backend, why = select_backend(config.backend)
    except RuntimeError as e:
        raise InvalidArgument(str(e)) from None
    log.info("kernel backend %s", why)
    lock_fd = take_endpoint(config, policy)
    raise_open_files()
    clean_root(config.root)  # leftovers of a daemon that was killed
    remove_dead_regions(config.shm_dir)
    stop = {"signal": None}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop["signal"] is None:
            log.info("%s: draining", signal.Signals(signum).name)
        stop["signal"] = signum

    def on_warning(signum: int, frame: FrameType | None) -> None:
        log.info("%s: a scheduler's warning to the job's processes (Slurm's --signal); serving on",
                 signal.Signals(signum).name)

    # (SIGHUP: a daemon started from a shell whose terminal closes died at once, with what it held)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    # (a daemon inside a Slurm allocation gets --signal=USR1@N with the trainers: its default action
    # would kill it, and the trainers' emergency snapshots with it)
    old.update({s: signal.signal(s, on_warning) for s in (signal.SIGUSR1, signal.SIGUSR2)})
    from snapd.daemon.notify import Notifier

    notifier = Notifier.from_environment()
    server = Server(config, policy=policy)
    server.status.backend = why
    try:
        if backend.name == "cuda":
            try:
                server.enable_gpu()
            except Exception as e:  # auto: a CUDA that half works must not keep the daemon from serving
                if config.backend == "cuda":
                    raise InvalidArgument(f"backend cuda: the GPU path cannot start: {e}") from None
                log.warning("GPU path off (%s: %s): device tensors will be staged by the clients",
                            type(e).__name__, e)
        server.bind()
        server.leases.gauges()
        if config.metrics_addr:
            server.metrics.serve(config.metrics_addr)
        log.info("serving %s; snapshots under %s; %d host buffers of %d MiB (growing to at most %d MiB for a "
                 "larger snapshot); pid %d", config.endpoint, config.root, config.host_buffers,
                 config.host_buffer_bytes >> 20, config.buffer_cap >> 20, os.getpid())
        log.info("access: uids %s, gids %s, socket %s, per-user directories %s", sorted(policy.uids),
                 sorted(policy.gids), f"group {policy.socket_gid}" if policy.socket_gid is not None
                 else "owner only", "on" if policy.user_dirs else "off")
        print(f"snapd: ready on {config.endpoint}", file=sys.stderr, flush=True)
        notifier.ready(server.status.line())  # socket bound, root writable
        return server.run(lambda: stop["signal"] is not None, notifier)
    finally:
        server.close()
        notifier.close()
        for s, h in old.items():
            signal.signal(s, h)
        socket_path(config.endpoint).unlink(missing_ok=True)
        os.close(lock_fd)
