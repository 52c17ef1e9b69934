"""The ``snapd`` commands that read snapshot directories, offline: ``ls``, ``inspect``, ``verify``
(exit status 1 when it finds damage, naming each bad chunk) and ``export``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from snapd.errors import FormatError
from snapd.format import catalog, root_jobs
from snapd.format import index as jobindex
from snapd.format.dtypes import itemsize
from snapd.format.global_reader import GlobalReader, open_snapshot
from snapd.format.jobdir import JobDir, step_of
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.reader import SnapshotReader
from snapd.report import human_bytes, metrics_text, table


class UsageError(Exception):
    """A bad path or argument: reported in one line, exit status 2."""


def cmd_ls(args: argparse.Namespace) -> int:
    if args.root.startswith("s3://"):
        from snapd.remote import listing

        return listing.ls(f"{args.root.rstrip('/')}/{args.job}" if args.job else args.root)
    root = Path(args.root)
    remote = args.remote or os.environ.get("SNAPD_REMOTE")
    if remote:
        from snapd.remote import listing

        if not args.job and root.is_dir():
            _jobs_of(root)  # (a root this user may not list: which directory to name instead)
        return listing.ls_tiers(root, args.job, remote)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    jobs = {args.job: root_jobs.job_at(root, args.job)} if args.job else _jobs_of(root)
    rows = []
    for name, jd in jobs.items():
        for s in catalog.list_snapshots(jd.root, jd.job):
            marks = ",".join(m for m, on in (("latest", s.latest), ("best", s.best),
                                              ("emergency", s.emergency)) if on)
            rows.append([name, str(s.step),
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
    elif not (p / MANIFEST_NAME).exists() and step_of(p.name) is None and root_jobs.listable(p) \
            and (names := list(_jobs_of(p))):
        raise UsageError(f"{p} is a snapshot root, not a job or a snapshot: name one of its jobs "
                         f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
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
        shared = [f for f in m.files if "shard" in f]
        print(f"step {m.step} of job {m.job}: {len(m.tensors)} tensors, {human_bytes(m.raw_bytes)} raw, "
              f"{human_bytes(m.stored_bytes)} stored in {len(m.files)} data file(s), codec {m.codec}"
              + (f"; {len(shared)} file(s) shared with earlier snapshots ("
                 + ", ".join(f["shared_from"] for f in shared) + ")" if shared else ""))
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


def _jobs_of(root: Path) -> dict[str, JobDir]:
    """The jobs with snapshots under a snapshot root (per-user ones as ``user/job``); a root this user
    may not list is a usage error that says which directory to name instead."""
    if not root_jobs.listable(root):
        raise UsageError(f"{root}: cannot list it (permission denied): a daemon serving several users "
                         f"keeps each one's jobs in {root}/<user>: name that directory")
    return {name: jd for name, jd in root_jobs.jobs(root).items() if _snapshot_dirs(jd.path)}


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
        jobs = [jd.path for jd in _jobs_of(path).values()]
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
