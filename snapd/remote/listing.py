"""``snapd ls s3://...`` and ``snapd verify s3://...``: the remote tier seen as a root of jobs.

``s3://bucket/prefix`` may name a root (jobs under it, per-user ones as ``user/job``) or one job
(its ``step-*`` snapshots right under it): one listing tells which. Only committed snapshots (whose
manifest object is there) are listed or checked.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapd.errors import FormatError, RemoteError, SnapshotNotFound
from snapd.format.index import JobIndex
from snapd.format.jobdir import SNAPSHOT_RE
from snapd.format.manifest import MANIFEST_NAME
from snapd.remote.reader import open_remote
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store, parse_url
from snapd.report import human_bytes, metrics_text, table


def jobs_at(url: str) -> Iterator[RemoteJob]:
    """The jobs at ``url`` with at least one committed snapshot, by name."""
    bucket, prefix = parse_url(url)
    store = Store.open(url)
    found: set[str] = set()
    for key in store.list(f"{prefix}/" if prefix else ""):
        parts = key[len(prefix) + 1 if prefix else 0:].split("/")
        if len(parts) >= 2 and parts[-1] == MANIFEST_NAME and SNAPSHOT_RE.match(parts[-2]):
            found.add("/".join(parts[:-2]))
    if "" in found:  # the url names a job itself
        parent, _, job = prefix.rpartition("/")
        yield RemoteJob(Store.open(f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}",
                                   endpoint_url=store.endpoint_url), job)
        found.discard("")
    for job in sorted(found):
        yield RemoteJob(store, job)


def ls(url: str) -> int:
    """``snapd ls s3://...``: the bucket's jobs and their committed snapshots."""
    rows = [row for rjob in jobs_at(url) for row in _rows(rjob.job, {}, rjob)]
    if not rows:
        print(f"{url}: no committed snapshots", file=sys.stderr)
        return 1
    print(table(rows, HEADER))
    return 0


HEADER = ["JOB", "STEP", "TIER", "TIME", "STORED", "RAW", "METRICS", "MARKS"]


def _rows(name: str, here: dict[int, Any], rjob: RemoteJob | None) -> list[list[str]]:
    """A job's snapshots in both tiers (``here``: the local ones by step, catalog's): ``latest``
    marks what ``load`` would open (the one taken last of either), ``best`` the local best, else the
    remote one."""
    there, rule = rjob.entries() if rjob is not None else ([], None)
    far = {e.step: e for e in there}
    best = next((s.step for s in here.values() if s.best), None)
    if best is None and there:
        pick = JobIndex(history=there, best_metric=rule).best
        best = pick.step if pick is not None else None
    # (as snapd.remote.tiers.locate: the local latest, unless a higher step of the bucket's was taken
    # after it; not the highest step: a run that went back to an earlier step takes lower ones later)
    local = next((s for s in here.values() if s.latest), None)
    above = max((e for e in there if local is None or e.step > local.step), key=lambda e: e.order,
                default=None)
    newest = above.step if above is not None and (local is None or above.order > local.order) else \
        local.step if local is not None else None
    rows = []
    for step in sorted(set(here) | set(far), key=lambda n: here[n].order if n in here else far[n].order):
        e = here.get(step) or far[step]
        tier = "local+remote" if step in here and step in far else "local" if step in here else "remote"
        marks = ",".join(m for m, on in (("latest", step == newest), ("best", step == best),
                                          ("emergency", e.emergency)) if on)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.created_unix_s))
        rows.append([name, str(step), tier, when, human_bytes(e.stored_bytes), human_bytes(e.raw_bytes),
                     metrics_text(e.metrics), marks])
    return rows


def verify(url: str) -> int:
    """Re-read every chunk of every committed snapshot at ``url``; 1 if any is damaged."""
    bad = checked = 0
    for rjob in jobs_at(url):
        for name in rjob.steps().values():
            where = rjob.where(name)
            try:
                with open_remote(rjob.store, rjob.job, name) as r:
                    problems = r.verify()
            except (FormatError, RemoteError) as e:
                problems = [str(e)]
            checked += 1
            for p in problems:
                print(f"BAD {where}: {p}")
            bad += bool(problems)
            if not problems:
                print(f"ok  {where}")
    if not checked:
        print(f"{url}: no committed snapshots", file=sys.stderr)
        return 1
    return 1 if bad else 0


def ls_tiers(root: Path, job: str | None, url: str) -> int:
    """``snapd ls ROOT [JOB] --remote URL``: both tiers, a TIER column."""
    from snapd.format import catalog, root_jobs

    remote = {r.job: r for r in jobs_at(url)}
    local = root_jobs.jobs(root) if root.is_dir() else {}  # (per-user ones as user/job, as the bucket's)
    rows = []
    for name in [job] if job else sorted(set(local) | set(remote)):
        jd = local.get(name) or root_jobs.job_at(root, name)
        here = {s.step: s for s in catalog.list_snapshots(jd.root, jd.job)} if jd.path.is_dir() else {}
        rows += _rows(name, here, remote.get(name))
    print(table(rows, HEADER))
    return 0


def open_url(url: str) -> Any:
    """``s3://bucket/prefix/job/step-N`` (one snapshot) or ``s3://bucket/prefix/job`` (its latest,
    named on stderr): a reader, for ``snapd inspect`` and ``snapd export``."""
    bucket, prefix = parse_url(url)
    head, _, last = prefix.rpartition("/")
    if SNAPSHOT_RE.match(last):
        parent, _, job = head.rpartition("/")
        return open_remote(Store.open(f"s3://{bucket}/{parent}".rstrip("/")), job, last)
    jobs = list(jobs_at(url))
    if len(jobs) != 1 or jobs[0].job != last:
        raise SnapshotNotFound(f"{url}: not a snapshot or a job with committed snapshots")
    steps = jobs[0].steps()
    name = steps[max(steps)]
    print(f"(the latest snapshot of this job: {name})", file=sys.stderr)
    return open_remote(jobs[0].store, jobs[0].job, name)
