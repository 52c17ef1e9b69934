"""`snapd status --json` (a stable, documented schema) and the Prometheus endpoint over HTTP."""

import json
import re
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

import snapd.client as snapd

STATUS_KEYS = {"version", "pid", "uptime_s", "endpoint", "root", "stopping", "backend", "metrics",
               "cuda_devices", "cuda_devices_in_use", "cuda_devices_skipped", "clients",
               "in_flight", "waiting_for_buffer", "buffers", "codecs", "counters", "last_error", "access",
               "jobs", "throughput", "rank_commits", "remote", "peers"}


def test_status_json_schema(daemon) -> None:
    with snapd.connect("st", endpoint=daemon.endpoint, spawn=False) as c:
        c.snapshot({"w": np.ones(1000, np.float32)}, step=1).wait(30)
        out = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", daemon.endpoint,
                              "--json"],
                             capture_output=True, text=True, timeout=30, cwd="/")
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        assert set(st) == STATUS_KEYS
        assert st["clients"] == [{"pid": c._hello["pid"], "uid": os.geteuid(), "job": "st",
                                  "jobs_root": str(c.root), "rank": 0, "world_size": 1, "held_buffers": 0,
                                  "last_snapshot": {"step": 1, "tensors": 1, "bytes": {
                                      "cuda_ipc": 0, "registered": 0, "inline": 0, "client": 4000}}}]
        assert set(st["access"]) == {"uids", "gids", "socket_gid", "user_dirs"}
        [job] = st["jobs"]
        assert (job["job"], job["dir"], job["persisted"], job["failed"], job["last_step"]) == \
            ("st", str(c.root / "st"), 1, 0, 1)
        assert st["throughput"]["snapshots"] == 1 and st["throughput"]["raw_bytes_per_s"] == round(4000 / 60)
        assert set(st["buffers"]) == {"count", "bytes_each", "sizes", "max_bytes_each", "max_bytes", "busy"}
        assert st["buffers"]["count"] == 2 and st["buffers"]["sizes"] == [32 << 20] * 2
        assert st["buffers"]["max_bytes_each"] >= 32 << 20
        assert set(st["counters"]) == {"persisted", "failed", "skipped", "bytes_raw", "bytes_stored"}
        assert st["counters"]["persisted"] == 1 and st["counters"]["bytes_raw"] == 4000
        assert st["codecs"]["st"]["codec"] in ("raw", "lz4", "shuffle-lz4", "shuffle-zstd")
        human = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", daemon.endpoint],
                               capture_output=True, text=True, timeout=30, cwd="/")
        assert human.returncode == 0 and "persisted 1" in human.stdout and "job st (" in human.stdout
        assert "step 1: 3.9 KiB client" in human.stdout, human.stdout
        assert "1 snapshots" in human.stdout, human.stdout
        assert re.search(rf"^st +0/1 +{c._hello['pid']} ", human.stdout, re.M), human.stdout  # (job, rank)
    gone = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", "ipc:///nonexistent/x.sock",
                           "--timeout-s", "0.5"], capture_output=True, text=True, timeout=30, cwd="/")
    assert gone.returncode == 2 and "no daemon answered" in gone.stderr


def test_status_says_how_each_clients_bytes_reached_the_daemon(daemon) -> None:
    """An operator's first question about a slow job: did its tensors come by the fast path? Per
    client, the last snapshot's bytes by path: registered regions and inline scalars here (a CPU
    run's registered path; tests/gpu checks cuda_ipc against staging)."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(100, 10)
    with snapd.connect("paths", endpoint=daemon.endpoint, spawn=False) as c, \
            snapd.connect("plain", endpoint=daemon.endpoint, spawn=False) as other:
        assert [cl["last_snapshot"] for cl in c.status()["clients"]] == [None, None]
        c.share(model)
        c.snapshot({"model": model.state_dict(), "step": torch.tensor(7.0)}, step=3).wait(30)
        other.snapshot({"w": np.ones(10, np.float64)}, step=1).wait(30)
        by_job = {cl["job"]: cl["last_snapshot"] for cl in c.status()["clients"]}
    assert by_job["paths"] == {"step": 3, "tensors": 3,
                               "bytes": {"cuda_ipc": 0, "registered": 4040, "inline": 4,
                                                                  "client": 0}}
    assert by_job["plain"]["bytes"] == {"cuda_ipc": 0, "registered": 0, "inline": 80, "client": 0}


def test_metrics_endpoint_scraped_over_http(start) -> None:
    d = start("--metrics-addr", "127.0.0.1:0")
    with snapd.connect("m", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot({"w": np.ones(1 << 16, np.float32)}, step=1).wait(30)
        url = c.status()["metrics"]
    assert url.startswith("http://127.0.0.1:")
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['snapd_snapshots_total{result="persisted"}'] == 1
    assert samples['snapd_snapshots_total{result="failed"}'] == 0
    assert samples["snapd_snapshot_raw_bytes_total"] == 1 << 18
    assert samples["snapd_persist_seconds_count"] == 1 and samples["snapd_stall_seconds_count"] == 1
    assert 'snapd_persist_seconds_bucket{le="1800.0"}' in samples
    assert samples['snapd_buffer_bytes{state="free"}'] == 2 * (32 << 20)
    assert samples["snapd_last_success_timestamp_seconds"] > 1.7e9
    assert any(k.startswith("snapd_build_info{") for k in samples)
