"""A burst of snapshots of a small state into a fresh daemon: ``python -m bench.small_burst``.

The daemon runs with its defaults (starting buffers sized from the machine's memory), as a
private daemon spawned by ``connect()`` would. The trainer snapshots a 4 KiB state ``--snapshots``
times without waiting for any to persist: while the first ones flush, every buffer is busy and
the daemon adds one. Reported: the trainer's stall per snapshot (median and max, ms) and the
daemon's resident memory after the burst. Before a buffer added for a request was sized for it,
the one added here was a starting buffer's size (about 2.9 GiB on 24 GiB), touched page by page
while the snapshot waited: stalls of 2.9-4.1 s. Results: bench/results/small-burst.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def run(snapshots: int, kib: int) -> dict:
    import snapd.client as snapd
    from snapd.client.connection import probe

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        endpoint = f"ipc://{tmp}/d.sock"
        daemon = subprocess.Popen([sys.executable, "-m", "snapd", "serve", "--root", f"{tmp}/root",
                                   "--endpoint",
                                   endpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while probe(endpoint, 0.2) is None:
                time.sleep(0.05)
            time.sleep(3)  # the starting buffers are touched in the background at start
            state = {"w": np.random.default_rng(0).standard_normal(kib * 256).astype(np.float32), "step": 0}
            stalls = []
            with snapd.connect("burst", endpoint=endpoint, spawn=False) as c:
                pending = []
                for step in range(snapshots):
                    state["step"] = step
                    p = c.snapshot(state, step=step)
                    stalls.append(p.stall_s * 1000)
                    pending.append(p)
                for p in pending:
                    p.wait(timeout=120)
                rss = psutil.Process(daemon.pid).memory_info().rss
        finally:
            daemon.terminate()
            daemon.wait(60)
    return {"snapshots": snapshots, "kib": kib, "stall_ms_median": statistics.median(stalls),
            "stall_ms_max": max(stalls), "stalls_ms": [round(s, 2) for s in stalls],
            "daemon_rss_mib": rss >> 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--kib", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = [run(args.snapshots, args.kib) for _ in range(args.runs)]
    lines = ["| run | stall median ms | stall max ms | daemon RSS MiB | stalls ms |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['stall_ms_median']:.2f} | {r['stall_ms_max']:.1f} | {r['daemon_rss_mib']} "
                     f"| {', '.join(map(str, r['stalls_ms']))} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS
     / "small-burst.md").write_text(f"# {args.snapshots} snapshots of {args.kib} KiB, burst\n\n{text}\n")


if __name__ == "__main__":
    main()
