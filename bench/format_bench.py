"""Save and load of a 1 GiB state (16 float32 tensors) against torch.save /
torch.load and safetensors, in one run, with ratios.

    python bench/format_bench.py [--gib 1.0] [--dir /var/tmp/snapd-bench]

"save" always includes fsync of every file written, for every method; the
disk floor is a raw sequential write + one fsync of exactly the bytes
snapd stored. Loads read from the page cache (the files were just written); safetensors
maps its file lazily, so its load includes one pass touching every tensor.
Weights are N(0, 0.02) float32, like a trained layer's spread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from snapd.format import SnapshotReader, list_snapshots, save_state
from snapd.format.writer import Retention


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="snapd-bench-"))
    n = int(args.gib * (1 << 30) / 4 / 16)
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(n, generator=gen) * 0.02 for i in range(16)}
    raw = sum(t.numel() * 4 for t in state.values())
    rows: dict[str, dict[str, float]] = {}
    try:
        def torch_save() -> None:
            p = work / "t.pt"
            torch.save(state, p)
            fsync_path(p)

        def st_save() -> None:
            p = work / "t.safetensors"
            save_file(state, str(p))
            fsync_path(p)

        for codec in ("raw", "shuffle-lz4", "shuffle-zstd"):
            step = iter(range(10**6))
            rows[f"snapd {codec}"] = {"save": min(timed(lambda codec=codec, step=step: save_state(
                work, f"j-{codec}", state, step=next(step), codec=codec, retention=Retention(keep_last=1),
                incremental=False),
                args.repeats))}
            info = list_snapshots(work, f"j-{codec}")[-1]
            rows[f"snapd {codec}"]["stored"] = info.stored_bytes

            def load(info=info) -> None:
                with SnapshotReader(info.path) as r:
                    r.load()
            rows[f"snapd {codec}"]["load"] = min(timed(load, args.repeats))
        rows["torch.save"] = {"save": min(timed(torch_save, args.repeats)), "stored": raw,
                              "load": min(timed(lambda: torch.load(work / "t.pt"), args.repeats))}
        rows["safetensors"] = {"save": min(timed(st_save, args.repeats)), "stored": raw,
                               "load": min(timed(lambda: [v.sum() for v in
                                                          load_file(str(work / "t.safetensors")).values()],
                                                 args.repeats))}
        for name in [k for k in rows if k.startswith("snapd")]:
            stored = int(rows[name]["stored"])
            buf = np.random.default_rng(0).integers(0, 255, size=stored, dtype=np.uint8)

            def floor(buf=buf) -> None:
                p = work / "floor.bin"
                with open(p, "wb") as f:
                    f.write(buf)
                    f.flush()
                    os.fsync(f.fileno())
                p.unlink()
            rows[name]["floor"] = statistics.median(timed(floor, args.repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"state: {raw / 2**30:.2f} GiB in 16 float32 tensors; {os.cpu_count()} cores; best of "
          f"{args.repeats}")
    print("| method | save s | save vs torch.save | save vs raw write+fsync of stored bytes | load s | "
          "load vs torch.load | load vs safetensors | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ts, tl, sl = rows["torch.save"]["save"], rows["torch.save"]["load"], rows["safetensors"]["load"]
    for name, r in rows.items():
        floor = f"{r['save'] / r['floor']:.2f}x" if "floor" in r else "-"
        print(f"| {name} | {r['save']:.2f} | {r['save'] / ts:.2f}x | {floor} | {r['load']:.2f} | "
              f"{r['load'] / tl:.2f}x | {r['load'] / sl:.2f}x | {raw / r['stored']:.3f} |")


if __name__ == "__main__":
    main()
