"""`python -m bench --quick` runs every scenario end to end and writes what it promises.

It checks outputs, never timings: speed is reported by the bench, not asserted.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PEERS = {"torch.save + fsync", "safetensors + fsync", "DCP save", "DCP async_save (default)",
         "DCP async_save (process, shm staging)"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_bench_writes_results_tables_and_plots(tmp_path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--dir",
                          str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["scenario"] for r in rows} == {"stall", "durable", "concurrency", "compression", "restore",
                                             "emergency"}
    assert all(r["values"] and r["machine"]["cores"] >= 1
               and "torch" in r["machine"]["versions"] for r in rows)
    stall = {r["method"] for r in rows if r["scenario"] == "stall" and r["metric"] == "stall_per_snapshot"}
    assert stall == PEERS | {"snapd plain", "snapd registered"}
    comp = {(r["data"], r["method"]) for r in rows if r["scenario"] == "compression" and r["metric"]
            == "ratio"}
    assert len(comp) == 16 and ("AdamW moments fp32", "shuffle-lz4") in comp
    restore = {(r["method"], r["metric"]) for r in rows if r["scenario"] == "restore"}
    assert ("snapd", "partial_cold") in restore and ("DCP load", "full_warm") in restore
    assert {r["method"] for r in rows if r["scenario"] == "emergency"} == {"snapd", "torch.save + fsync",
                                                                           "DCP save"}
    md = (out / "results.md").read_text()
    assert "## stall: stall_per_snapshot" in md and "| snapd plain |" in md and "snapd ÷ peer" in md
    for png in ("stall.png", "durable.png", "compression.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stall_scaling_bench_runs_every_method(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "bench.stall_scaling", "--counts", "3,12", "--reps", "2",
                          "--out", str(tmp_path), "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "stall-scaling.jsonl").read_text().splitlines()]
    assert {(r["tensors"], r["method"]) for r in rows} == {
        (n, m) for n in (3, 12) for m in ("torch.save + fsync", "DCP async_save (default)", "snapd plain",
                                          "snapd registered")}
    assert all(len(r["values"]) == 2 and r["unit"] == "ms" for r in rows)
    assert "| snapd registered |" in (tmp_path / "stall-scaling.md").read_text()


@pytest.mark.timeout(120)
def test_the_stand_in_gpu_stall_bench_runs(tmp_path) -> None:
    """`python -m bench.stall_fake_gpu` end to end, small: a line per count, nothing asserted of speed."""
    if subprocess.run(["which", "g++"], capture_output=True).returncode != 0:
        pytest.skip("no g++ to build the segment kernel for the host")
    run = subprocess.run([sys.executable, "-m", "bench.stall_fake_gpu", "--counts", "4,64", "--reps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "arrays: median" in line]
    assert [line.split()[0] for line in lines] == ["4", "64"], run.stdout


@pytest.mark.timeout(120)
def test_the_stand_in_gpu_prep_bench_runs() -> None:
    """`python -m bench.gpu_prep_fake` end to end, small."""
    if subprocess.run(["which", "g++"], capture_output=True).returncode != 0:
        pytest.skip("no g++ to build the segment kernel for the host")
    run = subprocess.run([sys.executable, "-m", "bench.gpu_prep_fake", "--counts", "8", "--reps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert any(line.split()[:2] == ["8", "tensors:"]
               and "kept" in line for line in run.stdout.splitlines()), \
        run.stdout


@pytest.mark.timeout(300)
def test_the_buffer_growth_bench_runs(tmp_path) -> None:
    """`python -m bench.buffer_growth` end to end, small: a row per method and measure."""
    run = subprocess.run([sys.executable, "-m", "bench.buffer_growth", "--mib", "8", "--snapshots", "2",
                          "--ranks", "3", "--rank-mib", "4", "--gap", "0.2", "--first-steps", "0.2",
                          "--dir", str(tmp_path), "--out", str(tmp_path / "g.md")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in (tmp_path / "g.md").read_text().splitlines() if line.startswith("| snapd")
            or line.startswith("| DCP")]
    assert len(rows) == 6 + 3 and all(len(r.split("|")) == 7 for r in rows), rows  # (3: the overlap table)
    assert "A second snapshot 0.2 s after the first" in (tmp_path / "g.md").read_text()
    ranks = [line for line in (tmp_path / "g.md").read_text().splitlines() if line.startswith("| 3 ranks")]
    assert len(ranks) == 4, ranks  # (two pools, then a new and a resumed job's first snapshots)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_incremental_bench_runs_and_snapd_writes_only_what_changed(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "bench", "--only", "incremental", "--quick", "--out",
                          str(tmp_path), "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=230)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    row = json.loads((tmp_path / "incremental.jsonl").read_text().splitlines()[-1])
    m = row["methods"]
    assert set(m) == {"snapd", "snapd, incremental off", "torch.save + fsync", "DCP async_save",
                      "snapd, every byte changed", "snapd, incremental off, every byte changed"}
    assert m["snapd"]["written"] <= 1.1 * row["changed_bytes"] + 8192  # (bytes, not time)
    assert m["snapd, incremental off"]["written"] >= row["state_bytes"]
    assert "| snapd |" in (tmp_path / "incremental.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_recovery_bench_restores_the_lost_rank_from_each_source(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "bench", "--only", "recovery", "--quick", "--out",
                          str(tmp_path), "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=230)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # (each restore checked bit-exact)
    rows = [json.loads(line) for line in (tmp_path / "recovery.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows if r["metric"].startswith("rank 2 of 3")}
    assert methods == {"local disk", "local disk, cold", "peers (replacement node)",
                       "peers: connect() to the part here (prefetch)",
                       "peers: restore() once the part is here",
                       "remote tier (fresh root)", "floor: peer link into memory",
                       "floor: ranged GETs into memory"}
    single = {r["method"] for r in rows if r["metric"].startswith("single process")}  # (recovery_single)
    assert single == {"local disk", "local disk, cold", "peer's copy (replacement node)",
                      "peer's copy: connect() to the snapshot here (prefetch)",
                      "peer's copy: restore() once it is here"}
    md = (tmp_path / "recovery.md").read_text()
    assert "| peers (replacement node) |" in md and "| peer's copy (replacement node) |" in md
