"""The ``snapd`` command: its parser, logging, ``serve``, ``status`` and ``rm``; the offline tools over
snapshot directories (``ls``, ``inspect``, ``verify``, ``export``) are snapd.inspection's.

Every bad path or argument ends in one line on stderr and exit status 2;
``verify`` exits 1 when it finds damage, naming each bad chunk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from snapd import __version__
from snapd.errors import SnapdError
from snapd.inspection import UsageError, cmd_export, cmd_inspect, cmd_ls, cmd_verify
from snapd.report import status_text

log = logging.getLogger(__name__)


class JournalFormatter(logging.Formatter):
    """Under systemd, stderr goes to journald: a ``<N>`` syslog prefix keeps each line's level."""

    LEVELS = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        level = self.LEVELS.get(record.levelno, 6)
        return "\n".join(f"<{level}>{line}" for line in super().format(record).splitlines())


def configure_logging(verbose: bool, default_level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # journald adds the time itself
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else default_level)
    for noisy in ("botocore", "boto3", "urllib3"):  # (the remote tier's SDK: its own lines at -v only)
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line too
        raise UsageError(message)


def cmd_serve(args: argparse.Namespace) -> int:
    from snapd.daemon.config import DaemonConfig
    from snapd.daemon.serve import serve

    flags = {"root": args.root, "endpoint": args.endpoint, "host_buffer_bytes": args.host_buffer_bytes,
             "max_host_buffer_bytes": args.max_host_buffer_bytes,
             "max_host_memory_bytes": args.max_host_memory_bytes,
             "host_buffers": args.host_buffers, "encode_threads": args.encode_threads, "codec": args.codec,
             "incremental": args.incremental,
             "drain_timeout_s": args.drain_timeout_s, "commit_timeout_s": args.commit_timeout_s,
             "exit_when_idle_s": args.exit_when_idle_s,
             "backend": args.backend, "metrics_addr": args.metrics_addr,
             "allowed_users": tuple(args.allowed_users.split(",")) if args.allowed_users else None,
             "socket_group": args.socket_group, "user_dirs": args.user_dirs, "remote": args.remote,
             "endpoint_url": args.endpoint_url, "peer_endpoint": args.peer_endpoint,
             "peers": tuple(args.peers.split(",")) if args.peers else None,
             "peer_directory": args.peer_directory, "peer_keys": args.peer_keys, "node_name": args.node_name,
             "replicas": args.replicas, "replica_memory_bytes": args.replica_memory_bytes,
             "replica_dir": args.replica_dir, "peer_timeout_s": args.peer_timeout_s,
             "peer_bytes_per_s": args.peer_bytes_per_s, "peer_check_s": args.peer_check_s}
    config = DaemonConfig.from_sources(flags, config_file=args.config)
    if args.check_config:
        from snapd.daemon.access import AccessPolicy

        access = AccessPolicy(config)  # user and group names must exist here
        print(config.to_toml())
        print(f"# resolved: uids {sorted(access.uids)}, gids {sorted(access.gids)}, socket gid "
              f"{access.socket_gid}, per-user directories {'on' if access.user_dirs else 'off'}")
        if config.remote is not None:  # reach the store now: a missing bucket or refused credentials
            from snapd.remote.store import Store

            Store.open(config.remote, endpoint_url=config.endpoint_url).check()
            print(f"# remote tier: {config.remote} answers")
        if config.peer_keys is not None:
            from snapd.peers.keys import PeerKeys

            keys = PeerKeys.load(config.peer_keys)
            print(f"# peer keys: {keys.where} ({len(keys.allowed)} accepted)")
        return 0
    return serve(config)


def cmd_status(args: argparse.Namespace) -> int:
    from snapd.client.connection import daemon_status

    st = daemon_status(args.endpoint, timeout_s=args.timeout_s)
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    print(status_text(st))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """``snapd rm JOB STEP...``: remove snapshots of one of your jobs through the daemon that wrote
    them (where it serves several users, your directory is its own: you may read it, not delete)."""
    import snapd.client as snapd

    from snapd.format.jobdir import check_step

    for step in args.steps:  # (before connecting, as Client.remove would)
        check_step(step)
    try:
        client = snapd.connect(args.job, endpoint=args.endpoint, spawn=False, keep_last=None, rank=0,
                               world_size=1, timeout_s=args.timeout_s)  # (one process, whatever ran it)
    except SnapdError as e:
        if e.code != "job_in_use":
            raise
        raise UsageError(f"{e} (a running job removes its own steps: Client.remove(step))") from None
    with client:
        for step in args.steps:
            gone = client.remove(step)
            print(f"removed {args.job} step {step}" if gone else f"{args.job} step {step}: not on this node")
    return 0


def cmd_peer_keys(args: argparse.Namespace) -> int:
    from snapd.peers.keys import create

    secret, public = create(args.directory, args.name)
    print(f"made {secret} (mode 600) and {public}: copy the directory to every node's daemon "
          f"(peer_keys = \"{args.directory}\"), readable only by the daemon's user")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="snapd", description="Snapshot daemon for ML training, and tools for its snapshots.")
    p.add_argument("-V", "--version", action="version", version=f"snapd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("ls", help="list the snapshots of a root or of one job")
    s.add_argument("root", help="the snapshot root (a daemon's --root), or s3://bucket/prefix")
    s.add_argument("job", nargs="?", help="one job under it (default: every job)")
    s.add_argument("--remote", help="s3://bucket/prefix: both tiers, with a TIER column (env SNAPD_REMOTE)")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("inspect", help="one row per tensor of a snapshot")
    s.add_argument("snapshot", help="a snapshot directory, or a job directory (its latest snapshot)")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("verify", help="recompute every checksum of a snapshot, a job or a whole root")
    s.add_argument("path", help="a root, a job directory or one snapshot directory; or s3://bucket/prefix[/job]")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("export", help="write a snapshot's tensors as one .safetensors file")
    s.add_argument("snapshot", help="a snapshot directory (step-...)")
    s.add_argument("out", help="the .safetensors file to write")
    s.add_argument("--keys", action="append", help="only tensors under this key prefix (repeatable)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("serve", help="run the snapshot daemon in the foreground")
    s.add_argument("--config", help="TOML config file (default /etc/snapd-ckpt/snapd.toml if it exists)")
    s.add_argument("--check-config", action="store_true",
                   help="print the effective configuration and exit (non-zero on any invalid value)")
    s.add_argument("--root", help="snapshot root directory (env SNAPD_ROOT)")
    s.add_argument("--endpoint", help="ipc://PATH to listen on (env SNAPD_ENDPOINT)")
    s.add_argument("--host-buffer-bytes", type=int, help="size of each host buffer at start")
    s.add_argument("--max-host-buffer-bytes", type=int,
                   help="the size a buffer may grow to for a larger snapshot (default: "
                        "max-host-memory-bytes / host-buffers)")
    s.add_argument("--max-host-memory-bytes", type=int,
                   help="all host buffers together, grown or added for snapshots that come at once "
                        "(default: half the memory limit and half of shm_dir)")
    s.add_argument("--host-buffers", type=int, help="number of host buffers (>= 2)")
    s.add_argument("--encode-threads", type=int,
                   help="threads that compress and checksum (default: the cores, at most 8)")
    s.add_argument("--codec", help="auto (default: measured per job) or raw, lz4, shuffle-lz4, shuffle-zstd")
    s.add_argument("--incremental", choices=("on", "off"),
                   help="on (default): chunks unchanged since a job's previous snapshot are not "
                   "written again")
    s.add_argument("--drain-timeout-s", type=float, help="how long SIGTERM may take to persist what is held")
    s.add_argument("--commit-timeout-s", type=float,
                   help="how long a rank's part waits for the other ranks' parts of its step (default 300)")
    s.add_argument("--exit-when-idle-s", type=float, help="exit after this long with no clients and no work")
    s.add_argument("--metrics-addr",
                   help="serve Prometheus metrics on IP:PORT (off by default; e.g. 127.0.0.1:9464)")
    s.add_argument("--backend", choices=("auto", "cuda", "cpu"),
                   help="kernels (env SNAPD_BACKEND; default auto)")
    s.add_argument("--socket-group", help="group that may reach the socket (default snapd-ckpt if it exists)")
    s.add_argument("--allowed-users",
                   help="comma-separated users (names or uids) allowed besides the daemon's own")
    s.add_argument("--user-dirs", choices=("auto", "on", "off"), help="snapshots under <root>/<user>/<job>")
    s.add_argument("--remote", help="s3://bucket[/prefix]: upload each snapshot there too "
                   "(env SNAPD_REMOTE)")
    s.add_argument("--endpoint-url", help="the S3 endpoint of a store that is not AWS "
                   "(env SNAPD_ENDPOINT_URL)")
    s.add_argument("--peer-endpoint", help="tcp://HOST:PORT this daemon serves its peers on (docs/peers.md)")
    s.add_argument("--peers", help="the other nodes' daemons: tcp://HOST:PORT,... (env SNAPD_PEERS)")
    s.add_argument("--peer-directory",
                   help="a directory every node mounts, where each daemon writes its endpoint")
    s.add_argument("--peer-keys", help="the CurveZMQ key directory (snapd peer-keys DIR)")
    s.add_argument("--node-name", help="this node's name for its peers (default: the host name)")
    s.add_argument("--replicas", type=int, help="how many other nodes hold each rank part (default 1)")
    s.add_argument("--replica-memory-bytes", type=int, help="memory for the peers' parts (default: RAM / 4)")
    s.add_argument("--replica-dir", help="where the peers' parts go when memory is full (default: refused)")
    s.add_argument("--peer-bytes-per-s", type=int, help="bandwidth bound of replication (default: none)")
    s.add_argument("--peer-timeout-s", type=float,
                   help="a peer silent this long is down for now (default 10)")
    s.add_argument("--peer-check-s", type=float, help="how often an idle replica holder is asked whether it "
                   "still holds its copies; those it lost are sent again (default 30)")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("peer-keys", help="make the CurveZMQ key pair a cluster's daemons share")
    s.add_argument("directory", help="the key directory to make (mode 700)")
    s.add_argument("--name", default="cluster", help="the pair's file name (default cluster)")
    s.set_defaults(fn=cmd_peer_keys)
    s = sub.add_parser("rm", help="remove snapshots of one of your jobs, through the daemon that wrote them")
    s.add_argument("job", help="the job's name (not running: its own client removes steps with remove())")
    s.add_argument("steps", nargs="+", type=int, metavar="STEP", help="the steps to remove")
    s.add_argument("--endpoint",
                   help="ipc://PATH of the daemon (env SNAPD_ENDPOINT; default: as snapd serve's)")
    s.add_argument("--timeout-s", type=float, default=10.0, help="how long to wait to connect (default 10)")
    s.set_defaults(fn=cmd_rm)
    s = sub.add_parser("status", help="ask a running daemon how it is doing")
    s.add_argument("--endpoint",
                   help="ipc://PATH of the daemon (env SNAPD_ENDPOINT; default: as snapd serve's)")
    s.add_argument("--json", action="store_true", help="machine-readable (docs/PROTOCOL.md)")
    s.add_argument("--timeout-s", type=float, default=3.0, help="how long to wait for an answer (default 3)")
    s.set_defaults(fn=cmd_status)
    sub.add_parser("demo", help="a small training run that snapshots, is killed, and resumes "
                   "(snapd demo --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # argparse cannot pass "--opts" through a REMAINDER subcommand
        from snapd.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    if not argv:  # the usage and the commands, not one line about a missing argument
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
        configure_logging(args.verbose, logging.INFO if args.command == "serve" else logging.WARNING)
        return args.fn(args)
    except UsageError as e:
        print(f"snapd: error: {e}", file=sys.stderr)
        return 2
    except (SnapdError, OSError) as e:
        print(f"snapd: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
