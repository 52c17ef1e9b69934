"""Where time to durable goes for a large state: ``python -m bench.durable_gap --gib 4 --dir /var/tmp``.

Each method writes the same ``--gib`` GiB durably, one after the other, ``--reps`` times; for each
write, what the kernel did meanwhile (/proc/vmstat and /proc/diskstats deltas): pages reclaimed
(and by whom: kswapd, or the writer itself stalling in direct reclaim), writeback throttling, and
the disk's own write time and bytes. Methods: the floor as ``bench.durable`` measures it (one
buffered write of a ready buffer, then fsync), the same bytes streamed as snapd's writer streams
them (32 MiB writes with sync_file_range), torch.save + fsync, snapd's writer in process
(``save_state``, raw), and snapd through a daemon (raw). Results: bench/results/durable-gap.md.
``--variants``: instead, snapd's writer in process with other writeback windows and chunk sizes,
interleaved with the streamed floor.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VMSTAT = ("pgsteal_kswapd", "pgsteal_direct", "allocstall_normal", "allocstall_movable", "pgscan_direct",
          "nr_dirtied", "nr_written", "workingset_refault_file")


def vmstat() -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


def disk_of(path: Path) -> str | None:
    """The block device (as /proc/diskstats names it) holding ``path``."""
    dev = os.stat(path).st_dev
    name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return name.resolve().name if name.exists() else None


def diskstats(disk: str | None) -> tuple[int, int]:
    """Sectors written and milliseconds spent writing, for ``disk``."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == disk:
            return int(f[9]), int(f[10])
    return 0, 0


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    return 0


def floor_one_write(buf: np.ndarray, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())


def floor_streamed(buf: np.ndarray, path: Path) -> None:
    sfr = ctypes.CDLL(None, use_errno=True).sync_file_range
    sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    step = 32 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(buf)
        for a in range(0, len(buf), step):
            os.write(fd, view[a:a + step])
            sfr(fd, a, step, 2)
            if a >= 2 * step:
                sfr(fd, a - 2 * step, step, 7)
        os.fsync(fd)
    finally:
        os.close(fd)


def measure(name: str, fn: Callable[[], Any], disk: str | None, rows: list[dict]) -> None:
    os.sync()
    time.sleep(1.0)
    v0, d0, t = vmstat(), diskstats(disk), time.perf_counter()
    fn()
    took = time.perf_counter() - t
    v1, d1 = vmstat(), diskstats(disk)
    row = {"method": name, "s": took, "disk_gib": (d1[0] - d0[0]) * 512 / 2**30,
           "disk_busy_s": (d1[1] - d0[1]) / 1000, **{k: v1.get(k, 0) - v0.get(k, 0) for k in VMSTAT}}
    rows.append(row)
    print(f"  {name:<34} {took:6.2f} s  disk {row['disk_gib']:.2f} GiB in {row['disk_busy_s']:.2f} s busy; "
          f"reclaimed kswapd {row['pgsteal_kswapd'] >> 8} MiB, direct {row['pgsteal_direct'] >> 8} MiB; "
          f"allocstalls {row['allocstall_normal'] + row['allocstall_movable']}", flush=True)


def _window(step: int, lag: int) -> Callable:
    """snapd's writer's writeback (``DataFile._writeback``) with ``step`` bytes a range, waiting
    for the range ``lag`` back."""
    from time import perf_counter

    def writeback(self: Any) -> None:
        if self._sfr is None:
            return
        t = perf_counter()
        while self._written - self._flushed >= step:
            self._sfr(self.fd, self._flushed, step, 2)
            if self._flushed - lag * step >= 0:
                self._sfr(self.fd, self._flushed - lag * step, step, 7)
            self._flushed += step
        self.io_seconds += perf_counter() - t
    return writeback


def variants(state: dict, buf: np.ndarray, work: Path, disk: str | None, reps: int) -> list[dict]:
    from snapd.format import data_file
    from snapd.format.saving import save_state

    original = data_file.DataFile._writeback
    cases = {"window 32 MiB x 2, 4 MiB chunks (snapd)": (original, 4),
             "window 64 MiB x 4": (_window(64 << 20, 4), 4), "window 128 MiB x 4": (_window(128 << 20, 4), 4),
             "16 MiB chunks": (original, 16), "32 MiB chunks": (original, 32)}
    rows: list[dict] = []
    try:
        for _ in range(reps):
            measure("floor: streamed as snapd writes", lambda: floor_streamed(buf, work / "floor.bin"), disk,
                    rows)
            (work / "floor.bin").unlink()
            for name, (writeback, mib) in cases.items():
                data_file.DataFile._writeback = writeback
                measure(name, lambda mib=mib: save_state(work / "local", "gap", state, step=1, codec="raw",
                                                         incremental=False, chunk_bytes=mib << 20),
                        disk, rows)
                shutil.rmtree(work / "local", ignore_errors=True)
    finally:
        data_file.DataFile._writeback = original
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    import snapd.client as snapd
    from bench.peers import SnapdDaemon
    from snapd.format.saving import save_state

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="snapd-gap-"))
    disk = disk_of(work)
    nbytes = args.gib << 30
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(nbytes // 4 // 16, generator=gen) * 0.02 for i in range(16)}
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    if args.variants:
        rows = variants(state, buf, work, disk, args.reps)
        shutil.rmtree(work, ignore_errors=True)
        write(rows, args, "durable-gap-variants.md")
        return rows
    daemon = SnapdDaemon(work, nbytes + (16 << 20), "--codec", "raw", "--incremental", "off")
    client = snapd.connect("gap", endpoint=daemon.endpoint, spawn=False, keep_last=1)
    print(f"{args.gib} GiB; memory {meminfo('MemTotal') / 2**30:.1f} GiB, dirty limit "
          f"{open('/proc/sys/vm/dirty_ratio').read().strip()}%; disk {disk}", flush=True)
    client.snapshot(state, step=0).wait(timeout=600)  # (the daemon's buffers made and faulted in)
    rows: list[dict] = []

    def torch_save() -> None:
        with open(work / "t.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    methods = {"floor: one write + fsync": lambda: floor_one_write(buf, work / "floor.bin"),
               "floor: streamed as snapd writes": lambda: floor_streamed(buf, work / "floor.bin"),
               "torch.save + fsync": torch_save,
               "snapd save_state (in process)": lambda: save_state(work / "local", "gap", state, step=1,
                                                                   codec="raw", incremental=False),
               "snapd daemon": lambda: client.snapshot(state, step=1).wait(timeout=600)}
    try:
        for _ in range(args.reps):
            for name, fn in methods.items():
                measure(name, fn, disk, rows)
                for p in (work / "floor.bin", work / "t.pt"):
                    p.unlink(missing_ok=True)
                shutil.rmtree(work / "local", ignore_errors=True)
    finally:
        client.close()
        daemon.close()
        shutil.rmtree(work, ignore_errors=True)
    write(rows, args, "durable-gap.md")
    return rows


def write(rows: list[dict], args: argparse.Namespace, name: str) -> None:
    lines = [f"# Time to durable at {args.gib} GiB: where it goes", "",
             f"`python -m bench.durable_gap --gib {args.gib} --reps {args.reps}"
             f"{' --variants' if args.variants else ''}`; median of {args.reps}.",
             "",
             "| method | seconds | disk GiB written | disk busy s | reclaimed by kswapd MiB "
             "| direct reclaim MiB | allocation stalls |", "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]

        def med(k: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[k] for r in rs)
        lines.append(f"| {method} | {med('s'):.2f} | {med('disk_gib'):.2f} | {med('disk_busy_s'):.2f} "
                     f"| {med('pgsteal_kswapd') / 256:.0f} | {med('pgsteal_direct') / 256:.0f} "
                     f"| {med('allocstall_normal') + med('allocstall_movable'):.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", action="store_true",
                    help="snapd's writer with other windows and chunk sizes")
    return ap


if __name__ == "__main__":
    run(parser().parse_args())
