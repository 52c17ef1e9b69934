"""How long a snapshot blocks the trainer, and how soon the state is durable.

    python bench/stall.py [--gib 1.0] [--repeats 3] [--dir /var/tmp]

One run, one process, 1 GiB of float32 torch tensors (16 x 64 MiB, N(0, 0.02)):
- snapd, plain path: ``Client.snapshot()`` (copy into the daemon's shared
  memory) against a daemon started for the run; durable = ``Pending.wait()``;
- snapd, registered path: the same after ``Client.share(state)`` (descriptors
  only; the daemon copies while the trainer runs on);
- ``torch.save`` + fsync (it blocks until durable);
- PyTorch DCP ``async_save``, default (thread executor) and its fastest
  configuration here (process executor + DefaultStager with shared-memory
  async staging; no pinned memory without CUDA). For DCP the stall counts
  until staging completes: before that the trainer may not change its tensors;
- the disk floor: a raw write + fsync of exactly the bytes snapd stored,
  measured right after each snapd save (this virtual disk drifts by 2x).
Reports medians (min-max) and ratios. Each method gets one warm-up save first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import snapd.client as snapd
from snapd.client.connection import probe


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def median(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def bench_snapd(state: dict, work: Path, repeats: int, raw: int) -> tuple[dict, int, list]:
    endpoint = f"ipc://{work}/bench.sock"
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "snapd", "serve", "--root", str(work / "snapd"), "--endpoint",
                             endpoint, "--host-buffer-bytes", str(raw + (16 << 20))], stdout=log, stderr=log)
    try:
        while probe(endpoint, 0.2) is None:
            if proc.poll() is not None:
                raise SystemExit((work / "daemon.log").read_text())
        rows, stored, floors = {}, 0, []
        with snapd.connect("bench", endpoint=endpoint, spawn=False, keep_last=1) as c:
            for path in ("plain", "registered"):
                if path == "registered":
                    c.share(state)  # once: the tensors now live in shared memory the daemon reads
                stalls, durable = [], []
                for i in range(repeats + 1):
                    t = time.perf_counter()
                    p = c.snapshot(state, step=i)
                    s = time.perf_counter() - t
                    info = p.wait()
                    d = time.perf_counter() - t
                    if i:  # the first is the warm-up (first touch of the daemon's buffers)
                        stalls.append(s)
                        durable.append(d)
                        stored = info.stored_bytes
                        floors += disk_floor(stored, work, 1)  # right after: the disk drifts by 2x
                rows[f"snapd {path} path"] = (stalls, durable)
            why = c.status()["codecs"].get("bench", {}).get("reason", "")
        print(f"snapd codec chosen by the daemon: {info.codec}: {why}", file=sys.stderr)
        return rows, stored, floors
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def bench_torch_save(state: dict, work: Path, repeats: int) -> list[float]:
    out = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        with open(work / "t.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if i:
            out.append(time.perf_counter() - t)
    return out


def bench_dcp(state: dict, work: Path, repeats: int, fastest: bool) -> tuple[list, list]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import torch.distributed as dist

    if fastest and not dist.is_initialized():  # the process executor needs a (one-rank) process group
        dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
    stalls, durable = [], []
    for i in range(repeats + 1):
        path = work / f"dcp-{int(fastest)}-{i}"
        kw = {}
        if fastest:
            kw = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS,
                  "async_stager": DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=True,
                                                               use_async_staging=True, use_non_blocking_copy=False))}
        t = time.perf_counter()
        resp = dcp.async_save(state, checkpoint_id=str(path), no_dist=not fastest, **kw)
        if hasattr(resp, "staging_completion"):
            resp.staging_completion.result()
            s = time.perf_counter() - t
            resp.upload_completion.result()
        else:
            s = time.perf_counter() - t
            resp.result()
        d = time.perf_counter() - t
        shutil.rmtree(path, ignore_errors=True)
        if i:
            stalls.append(s)
            durable.append(d)
    return stalls, durable


def disk_floor(nbytes: int, work: Path, repeats: int) -> list[float]:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        with open(work / "floor.bin", "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        out.append(time.perf_counter() - t)
        (work / "floor.bin").unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="snapd-stall-"))
    gen = torch.Generator().manual_seed(0)
    n = int(args.gib * (1 << 30) / 4 / 16)
    state = {f"layer{i}.weight": torch.randn(n, generator=gen) * 0.02 for i in range(16)}
    raw = sum(t.numel() * 4 for t in state.values())
    rows: dict[str, tuple[list, list]] = {}
    try:
        snapd_rows, stored, floor = bench_snapd(state, work, args.repeats, raw)
        rows.update(snapd_rows)
        ts = bench_torch_save(state, work, args.repeats)
        rows["torch.save + fsync"] = (ts, ts)
        for fastest, name in ((False, "DCP async_save (default)"), (True, "DCP async_save (process, shm staging)")):
            try:
                rows[name] = bench_dcp(state, work, args.repeats, fastest)
            except Exception as e:  # report, do not hide, a configuration this torch cannot run
                print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"state {raw / 2**30:.2f} GiB (16 float32 tensors); {os.cpu_count()} cores; torch {torch.__version__}; "
          f"median (min-max) of {args.repeats}, seconds")
    print(f"disk floor: raw write + fsync of snapd's {stored / 2**30:.2f} GiB stored, measured right after each "
          f"snapd save: {median(floor)}")
    ref = {k: statistics.median(v[0]) for k, v in rows.items()}
    dcp_default = ref.get("DCP async_save (default)")
    print("| method | stall | time to durable | stall vs DCP default | stall vs torch.save | durable vs floor |")
    print("|---|---|---|---|---|---|")
    for name, (s, d) in rows.items():
        vs_dcp = f"{statistics.median(s) / dcp_default:.3f}x" if dcp_default else "-"
        print(f"| {name} | {median(s)} | {median(d)} | {vs_dcp} | "
              f"{statistics.median(s) / ref['torch.save + fsync']:.3f}x | "
              f"{statistics.median(d) / statistics.median(floor):.2f}x |")


if __name__ == "__main__":
    main()
