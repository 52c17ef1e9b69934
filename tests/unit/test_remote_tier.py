"""The remote tier's parts that need no server: its URL, its settings, the upload backlog's order
and bound, the hold local retention keeps for uploads, and the bandwidth bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snapd.daemon.config import DaemonConfig
from snapd.daemon.uploads import Uploader
from snapd.errors import InvalidArgument
from snapd.format.jobdir import JobDir
from snapd.format.saving import save_state
from snapd.format.retention import Retention, prune
from snapd.remote.bandwidth import Pacer
from snapd.remote.store import parse_url


@pytest.mark.parametrize("url, parsed", [("s3://bucket", ("bucket", "")),
                                         ("s3://b.c-d/p/q/", ("b.c-d", "p/q"))])
def test_remote_urls(url, parsed) -> None:
    assert parse_url(url) == parsed


@pytest.mark.parametrize("url", ["bucket", "s3://", "s3://B", "s3://abc/../x", "gs://bucket", "s3://abc/a//b",
                                 None])
def test_bad_remote_urls_are_refused_by_name(url) -> None:
    with pytest.raises(InvalidArgument, match="invalid remote"):
        parse_url(url)


def config(tmp_path: Path, **kw) -> DaemonConfig:
    return DaemonConfig(root=tmp_path, endpoint=f"ipc://{tmp_path}/s", host_buffer_bytes=1 << 20, **kw)


@pytest.mark.parametrize("kw, words", [({"remote": "s3:/x"}, "invalid remote"),
                                       ({"remote_backlog": 0}, "remote_backlog"),
                                       ({"remote_threads": 0}, "remote_threads"),
                                       ({"remote_keep_last": 0}, "remote_keep_last"),
                                       ({"endpoint_url": "minio:9000"}, "endpoint_url")])
def test_bad_remote_settings(tmp_path, kw, words) -> None:
    with pytest.raises(InvalidArgument, match=words):
        config(tmp_path, **kw)


def test_the_backlog_is_bounded_newest_first_and_held_from_local_retention(tmp_path) -> None:
    up = Uploader(config(tmp_path, remote="s3://bucket/p", remote_backlog=2))  # (not started: no server)
    job = tmp_path / "j"
    for step in (1, 2, 3, 4):
        up.add(tmp_path, "j", job / f"step-{step:012d}", step, step == 1, 10, Retention(), None)
    st = up.status()
    # step 1 is an emergency snapshot: never skipped; the oldest others went
    assert (st["backlog"], st["skipped"], st["backlog_bytes"]) == (2, 2, 20)
    assert up.held(job) == {"step-000000000001", "step-000000000004"}
    job.mkdir()
    assert up.held(job, next_bytes=1 << 20) == {"step-000000000001", "step-000000000004"}
    assert up.held(job, next_bytes=1 << 60) == frozenset()  # no room for two more: space wins
    assert up._next().step == 1  # emergency first
    up._busy = None
    del up._backlog[job / "step-000000000001"]
    assert up._next().step == 4
    assert up.unfinished() == [f"j step 4: {job / 'step-000000000004'}"]
    # the same step saved anew while its upload runs: the new version is queued, not merged into it
    busy = up._next()
    up.add(tmp_path, "j", busy.path, 4, False, 10, Retention(), None)
    assert up._backlog[busy.path] is not busy


def test_retention_leaves_held_snapshots_until_they_are_let_go(root) -> None:
    for step in (1, 2, 3):
        save_state(root, "j", {"x": np.ones(4)}, step=step, retention=Retention(keep_last=1,
                                                                                hold=frozenset({"step-000000000001"})))
    assert sorted(p.name for p in (root / "j").glob("step-*")) == ["step-000000000001", "step-000000000003"]
    prune(JobDir(root, "j"), Retention(keep_last=1))
    assert sorted(p.name for p in (root / "j").glob("step-*")) == ["step-000000000003"]


def test_the_pacer_holds_uploads_to_their_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s
    pace = Pacer(8 << 20, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        pace.take(1 << 20)  # 6 MiB at 8 MiB/s: the first 2 MiB are the burst, the other 4 wait
    assert sum(slept) == pytest.approx(0.5)
    now[0] += 10.0  # idle for long: only the burst is credited, not ten seconds' worth
    slept.clear()
    pace.take(3 << 20)
    assert sum(slept) == pytest.approx(1 / 8)
