"""The ``snapd`` command: offline tools over snapshot directories.

Every bad path or argument ends in one line on stderr and exit status 2;
``verify`` exits 1 when it finds damage, naming each bad chunk.
"""

from __future__ import annotations

import argparse
import math
import json
import logging
import os
import sys
import time
from pathlib import Path

from snapd import __version__
from snapd.errors import FormatError, SnapdError
from snapd.format import catalog
from snapd.format import index as jobindex
from snapd.format.jobdir import JOB_NAME_RE, JobDir, step_of
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.dtypes import itemsize
from snapd.format.global_reader import GlobalReader, open_snapshot
from snapd.format.reader import SnapshotReader
from snapd.report import human_bytes, metrics_text, status_text, table

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


class UsageError(Exception):
    """A bad path or argument: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line too
        raise UsageError(message)


def cmd_ls(args: argparse.Namespace) -> int:
    if args.root.startswith("s3://"):
        from snapd.remote import listing

        return listing.ls(f"{args.root.rstrip('/')}/{args.job}" if args.job else args.root)
    root = Path(args.root)
    remote = args.remote or os.environ.get("SNAPD_REMOTE")
    if remote:
        from snapd.remote import listing

        return listing.ls_tiers(root, args.job, remote)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    jobs = [args.job] if args.job else sorted(p.name for p in root.iterdir()
                                               if p.is_dir() and JOB_NAME_RE.match(p.name))
    rows = []
    for job in jobs:
        for s in catalog.list_snapshots(root, job):
            marks = ",".join(m for m, on in (("latest", s.latest), ("best", s.best),
                                              ("emergency", s.emergency)) if on)
            rows.append([job, str(s.step),
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_unix_s)),
                         human_bytes(s.stored_bytes), human_bytes(s.raw_bytes), f"{s.ratio:.2f}x",
                         metrics_text(s.metrics), marks])
    print(table(rows, ["JOB", "STEP", "TIME", "STORED", "RAW", "RATIO", "METRICS", "MARKS"]))
    return 0


def _open(path: str) -> SnapshotReader | GlobalReader:
    """A snapshot directory, or a job directory's latest snapshot (named on stderr); or the same in
    the remote tier (``s3://...``)."""
    if path.startswith("s3://"):
        from snapd.remote.listing import open_url

        return open_url(path)
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such snapshot directory")
    if p.is_file():
        raise UsageError(f"{p} is a file, not a snapshot directory")
    if not (p / MANIFEST_NAME).exists() and _snapshot_dirs(p):
        p = catalog.resolve(p.resolve().parent, p.resolve().name, "latest")
        print(f"(the latest snapshot of this job: {p.name})", file=sys.stderr)
    return open_snapshot(p)


def _inspect_global(r: GlobalReader) -> None:
    g = r.global_manifest
    print(f"step {g.step} of job {g.job}: a global snapshot of {g.world_size} ranks, "
          f"{human_bytes(g.raw_bytes)} raw, {human_bytes(g.stored_bytes)} stored, codec {g.codec}")
    rows = [[t.key, t.dtype, "x".join(map(str, t.shape)) or "()", human_bytes(t.shape and
             math.prod(t.shape) * itemsize(t.dtype) or itemsize(t.dtype)), t.scope,
             ",".join(sorted({str(p.rank) for p in t.pieces}, key=int))] for t in g.tensors.values()]
    print(table(rows, ["KEY", "DTYPE", "SHAPE", "BYTES", "SCOPE", "STORED BY RANKS"]))
    parts = []
    for p in g.parts:
        own = r.part(p["rank"]).manifest
        parts.append([str(p["rank"]), p["dir"], str(sum(t.scope == "rank" for t in own.tensors)),
                      human_bytes(p["raw_bytes"]), human_bytes(p["stored_bytes"])])
    print(table(parts, ["RANK", "PART", "OWN VALUES", "RAW", "STORED"]))


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open(args.snapshot) as r:
        if isinstance(r, GlobalReader):
            _inspect_global(r)
            return 0
        m = r.manifest
        rows = []
        for t in m.tensors:
            stored = sum(c.stored for c in t.chunks)
            codecs = "+".join(sorted({c.codec for c in t.chunks})) or "-"
            rows.append([t.key, t.dtype, "x".join(map(str, t.shape)) or "()", human_bytes(t.nbytes), codecs,
                         f"{t.nbytes / stored:.2f}x" if stored else "-"])
        print(f"step {m.step} of job {m.job}: {len(m.tensors)} tensors, {human_bytes(m.raw_bytes)} raw, "
              f"{human_bytes(m.stored_bytes)} stored in {len(m.files)} data file(s), codec {m.codec}")
        print(table(rows, ["KEY", "DTYPE", "SHAPE", "BYTES", "CODEC", "RATIO"]))
    return 0


def _snapshot_dirs(path: Path) -> list[Path]:
    if (path / MANIFEST_NAME).exists() or step_of(path.name) is not None:
        return [path]
    if path.is_file():
        raise UsageError(f"{path} is a file, not a snapshot, job or root directory")
    if path.is_dir():
        return sorted(p for p in path.iterdir() if step_of(p.name) is not None and p.is_dir())
    raise UsageError(f"{path}: no such snapshot or job directory")


def _jobs_under(root: Path) -> list[Path]:
    """The job directories under a snapshot root, and under its per-user directories."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and JOB_NAME_RE.match(p.name)):
        out += [d] if _snapshot_dirs(d) else _jobs_under(d) if d.parent == root else []
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    if args.path.startswith("s3://"):
        from snapd.remote import listing

        return listing.verify(args.path)
    path = Path(args.path)
    dirs = _snapshot_dirs(path)
    if dirs == [path]:  # one snapshot
        jobs: list[Path] = []
    elif dirs:  # a job
        jobs = [path]
    else:  # a root: every job under it
        jobs = _jobs_under(path)
        dirs = [d for j in jobs for d in _snapshot_dirs(j)]
    if not dirs:
        raise UsageError(f"{args.path}: no snapshots in this directory")
    bad = 0
    for job in jobs:  # each job's index too
        damage, notes = jobindex.problems(JobDir(job.resolve().parent, job.resolve().name))
        for p in damage:
            print(f"BAD {p}")
        for p in notes:
            print(f"note {p}")
        bad += len(damage)
    show = sys.stderr.isatty()
    for d in dirs:
        try:
            with open_snapshot(d) as r:
                total = (r.global_manifest if isinstance(r, GlobalReader) else r.manifest).stored_bytes or 1
                done = 0

                def progress(n: int, d: Path = d, total: int = total) -> None:
                    nonlocal done
                    done += n
                    if show:
                        print(f"\r{d.name}: {100 * done // total:3d}%", end="", file=sys.stderr, flush=True)

                problems = r.verify(progress)
                if show:
                    print("\r", end="", file=sys.stderr)
        except FormatError as e:
            problems = [str(e)]
        for p in problems:
            print(f"BAD {d}: {p}")
        bad += bool(problems)
        if not problems:
            print(f"ok  {d}")
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from snapd.format.safetensors_export import export

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory for the output file")
    with _open(args.snapshot) as r:
        n = export(r, out, args.keys)
    print(f"wrote {n} tensors to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from snapd.daemon.config import DaemonConfig
    from snapd.daemon.serve import serve

    flags = {"root": args.root, "endpoint": args.endpoint, "host_buffer_bytes": args.host_buffer_bytes,
             "max_host_buffer_bytes": args.max_host_buffer_bytes,
             "max_host_memory_bytes": args.max_host_memory_bytes,
             "host_buffers": args.host_buffers, "encode_threads": args.encode_threads, "codec": args.codec,
             "drain_timeout_s": args.drain_timeout_s, "commit_timeout_s": args.commit_timeout_s,
             "exit_when_idle_s": args.exit_when_idle_s,
             "backend": args.backend, "metrics_addr": args.metrics_addr,
             "allowed_users": tuple(args.allowed_users.split(",")) if args.allowed_users else None,
             "socket_group": args.socket_group, "user_dirs": args.user_dirs, "remote": args.remote,
             "endpoint_url": args.endpoint_url}
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
    s.set_defaults(fn=cmd_serve)
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
