"""What a snapshot larger than the host buffers costs: ``python -m bench.buffer_growth``.

The buffer such a snapshot is granted grows once (a fresh, larger shared-memory file), so that
snapshot writes fresh pages and the ones after it run at full speed. Three methods on the same
torch state in the same run, each snapshot waited to durable before the next:
- snapd with buffers sized for the state at start (prefaulted before the first snapshot);
- snapd with 64 MiB buffers, grown by the first snapshots (the default of a daemon whose
  ``host_buffer_bytes`` is below a rank's state);
- DCP ``async_save``, whose first call also allocates its staging memory.
For each: the stall (``snapshot()`` / ``async_save`` until the trainer may go on) and the time to
durable, per snapshot index, and the first snapshot against the median of the later ones.

Then, on fresh daemons, a second snapshot ``--gap`` seconds after the first, before the first is
durable (as an emergency snapshot at preemption comes): with 64 MiB buffers, its buffer is the
second one of the double buffer, which must have grown too. And a job that resumes: it ran once,
ended (the daemon's buffers went back to 64 MiB), then connects again, restores, trains for
``--first-steps`` seconds (a sleep) and snapshots.

``--ranks N`` also runs N trainer processes at once on one daemon with two buffers at start (the
ranks of a node): with no more buffers allowed (``max_host_memory_bytes`` at two buffers, as
before buffers could be added) and with the default, which adds one when all are busy. Then N
ranks of a job that resumes on a daemon with 64 MiB buffers: each connects, restores, trains
``--first-steps`` seconds and snapshots, once as a new job and once resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.peers import DcpAsync, Snapd, SnapdDaemon
from snapd.client.connection import daemon_status

MIB = 1 << 20


def _state(nbytes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = nbytes // 16 // 4
    return {f"layers.{i}.weight": torch.randn(n, generator=g) * 0.02 for i in range(16)}


def _wait_prefaulted(log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "host buffers ready" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not touch its buffers in {timeout_s} s")
        time.sleep(0.05)


def measure(method: Any, state: dict, snapshots: int) -> list[tuple[float, float]]:
    """(stall, time to durable) in seconds for each snapshot, in order."""
    out = []
    for step in range(snapshots):
        next(iter(state.values()))[:4] += 1.0  # a training step's change
        t0 = time.perf_counter()
        handle = method.start(state, step)
        stall = time.perf_counter() - t0
        handle.wait()
        out.append((stall, time.perf_counter() - t0))
    return out


def measure_overlap(method: Any, state: dict, gap_s: float) -> list[tuple[float, float]]:
    """(stall, time to durable) of a first snapshot and of a second one ``gap_s`` after it, sent
    before the first is durable."""
    t0 = time.perf_counter()
    first = method.start(state, 0)
    stall0 = time.perf_counter() - t0
    time.sleep(gap_s)
    next(iter(state.values()))[:4] += 1.0
    t1 = time.perf_counter()
    second = method.start(state, 1)
    stall1 = time.perf_counter() - t1
    first.wait()
    done0 = time.perf_counter() - t0
    second.wait()
    return [(stall0, done0), (stall1, time.perf_counter() - t1)]


SNAPD_SETTINGS = (("snapd, buffers sized at start", None), ("snapd, 64 MiB buffers grown", 64 * MIB))


def run(nbytes: int, snapshots: int, work: Path, gap_s: float) -> tuple[dict, dict]:
    """Each method's (stall, to durable) per snapshot, one after another and with an overlap."""
    state = _state(nbytes)
    results: dict[str, list[tuple[float, float]]] = {}
    overlap: dict[str, list[tuple[float, float]]] = {}
    for i, (name, buffer_bytes) in enumerate(SNAPD_SETTINGS):
        for table, fn in ((results, lambda m: measure(m, state, snapshots)),
                          (overlap, lambda m: measure_overlap(m, state, gap_s))):
            # (short: the socket's path must fit sun_path's 108 bytes)
            run_dir = work / f"d{i}{int(table is overlap)}"
            run_dir.mkdir()
            daemon = SnapdDaemon(run_dir, buffer_bytes or nbytes + 16 * MIB, "--codec", "shuffle-lz4")
            try:
                _wait_prefaulted(run_dir / "snapd.log")
                method = Snapd(daemon, "growth")
                table[name] = fn(method)
                method.close()
            finally:
                daemon.close()
    dcp = DcpAsync(work, fastest=False)
    results[dcp.name] = measure(dcp, state, snapshots)
    overlap[dcp.name] = measure_overlap(dcp, state, gap_s)
    dcp.close()
    return results, overlap


def run_resume(nbytes: int, work: Path, first_steps_s: float) -> dict[str, float]:
    """A job's first snapshot stall when new, and when it resumes (its restore, then
    ``first_steps_s`` of training) on the same daemon with 64 MiB buffers, once the first run's
    buffers have gone back."""
    state = _state(nbytes)
    run_dir = work / "rs"
    run_dir.mkdir()
    daemon = SnapdDaemon(run_dir, 64 * MIB)
    try:
        _wait_prefaulted(run_dir / "snapd.log")
        method = Snapd(daemon, "resume")
        ((new_stall, _),) = measure(method, state, 1)
        method.close()
        deadline = time.monotonic() + 60
        while daemon_status(daemon.endpoint)["buffers"]["sizes"] != [64 * MIB] * 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon kept the ended job's buffers")
            time.sleep(0.1)
        method = Snapd(daemon, "resume")
        t0 = time.perf_counter()
        method.client.restore()
        restore_s = time.perf_counter() - t0
        time.sleep(first_steps_s)
        ((resumed_stall, _),) = measure(method, state, 1)
        method.close()
    finally:
        daemon.close()
    return {"new": new_stall, "restore": restore_s, "resumed": resumed_stall, "steps": first_steps_s}


def run_ranks(n: int, nbytes: int, snapshots: int, work: Path) -> dict[str, list[float]]:
    """Each setting's stalls over ``n`` trainers (bench.durable's trainer, each waits to durable)."""
    out = {}
    one = nbytes + 16 * MIB
    for i, (name,
            extra) in enumerate(((f"{n} ranks, 2 buffers and no more",
                                  ["--max-host-memory-bytes", str(2 * one)]),
                                       (f"{n} ranks, 2 buffers at start, more added", []))):
        run_dir = work / f"r{i}"
        run_dir.mkdir()
        daemon = SnapdDaemon(run_dir, one, *extra)
        try:
            procs = [subprocess.Popen([sys.executable, "-m", "bench.durable", "trainer", daemon.endpoint,
                                       str(nbytes),
                                       str(snapshots), f"rank{r}"], stdout=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parent.parent) for r in range(n)]
            res = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]
        finally:
            daemon.close()
        out[name] = sorted(x for r in res for x in r["stall"])
    return out


def report(results: dict[str, list[tuple[float, float]]], nbytes: int, command: str) -> str:
    n = len(next(iter(results.values())))
    lines = [f"# A snapshot larger than the host buffers ({nbytes / MIB:.0f} MiB of float32, "
             f"{os.cpu_count()} cores)", "",
             f"`{command}`; seconds, each snapshot waited to durable before the "
             "next.", "", "| method | what | " + " | ".join(f"#{i + 1}" for i in range(n)) +
             " | #1 / median of the rest |", "|---|---|" + "---|" * (n + 1)]
    for name, rows in results.items():
        for col, what in ((0, "stall"), (1, "to durable")):
            vals = [r[col] for r in rows]
            rest = statistics.median(vals[1:]) if n > 1 else float("nan")
            lines.append(f"| {name} | {what} | " + " | ".join(f"{v:.3f}" for v in vals) +
                         f" | {vals[0] / rest:.2f} |")
    return "\n".join(lines) + "\n"


def report_overlap(overlap: dict[str, list[tuple[float, float]]], gap_s: float) -> str:
    lines = ["",
             f"A second snapshot {gap_s:g} s after the first, before the first is durable (fresh daemons; "
             "DCP allows one save in flight, so its second waits for the first):", "",
             "| method | #1 stall | #1 to durable | #2 stall | #2 to durable |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a[0]:.3f} | {a[1]:.3f} | {b[0]:.3f} | {b[1]:.3f} |" for name,
              (a, b) in overlap.items()]
    return "\n".join(lines) + "\n"


def report_resume(r: dict[str, float]) -> str:
    return "\n".join(["",
                      "A job that resumes on a daemon with 64 MiB buffers, seconds (the daemon sizes the "
                      "buffers "
                       f"for it while it restores and trains {r['steps']:g} s before its first snapshot):",
                       "", "| first snapshot stall, new job | restore | first snapshot stall, resumed job |",
                       "|---|---|---|",
                       f"| {r['new']:.3f} | {r['restore']:.3f} | {r['resumed']:.3f} |"]) + "\n"


def rank_first_snapshot(endpoint: str, nbytes: int, job: str, first_steps_s: float) -> None:
    """One rank of ``run_ranks_resume`` (a process of its own): connect, restore what the job has,
    train, and print the first snapshot's stall."""
    import snapd.client as snapd

    state = _state(nbytes)
    with snapd.connect(job, endpoint=endpoint, spawn=False, keep_last=1) as c:
        if c.list():
            c.restore()
        time.sleep(first_steps_s)
        t0 = time.perf_counter()
        p = c.snapshot(state, step=len(c.list()))
        stall = time.perf_counter() - t0
        p.wait()
    print(json.dumps({"stall": stall}))


def run_ranks_resume(n: int, nbytes: int, work: Path, first_steps_s: float) -> dict[str, list[float]]:
    """The first snapshots' stalls of ``n`` ranks on a daemon with 64 MiB buffers: a new job, then
    the same job resumed once the daemon's buffers have gone back."""
    run_dir = work / "rr"
    run_dir.mkdir()
    daemon = SnapdDaemon(run_dir, 64 * MIB)
    out = {}
    try:
        for name in (f"{n} ranks, new job", f"{n} ranks, resumed"):
            deadline = time.monotonic() + 60
            while daemon_status(daemon.endpoint)["buffers"]["sizes"] != [64 * MIB] * 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon kept the ended job's buffers")
                time.sleep(0.1)
            procs = [subprocess.Popen([sys.executable, "-m", "bench.buffer_growth", "rank", daemon.endpoint,
                                       str(nbytes), f"resume-rank{r}",
                                       str(first_steps_s)], stdout=subprocess.PIPE,
                                      text=True,
                                      cwd=Path(__file__).resolve().parent.parent) for r in range(n)]
            out[name] = sorted(json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1])["stall"]
                               for p in procs)
    finally:
        daemon.close()
    return out


def report_ranks(stalls: dict[str, list[float]], nbytes: int) -> str:
    lines = ["",
             f"Ranks at once, {nbytes / MIB:.0f} MiB each, stall in seconds over every rank's snapshots "
             "(new job and resumed: each rank's first snapshot, 64 MiB buffers, after its restore and "
             "--first-steps):", "", "| setting | median | max |", "|---|---|---|"]
    lines += [f"| {name} | {statistics.median(v):.3f} | {v[-1]:.3f} |" for name, v in stalls.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.buffer_growth", description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="state size (default 512 MiB)")
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the checkpoints are written (a real disk)")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    ap.add_argument("--gap", type=float, default=1.0,
                    help="seconds between the overlapping snapshots (default 1)")
    ap.add_argument("--first-steps", type=float, default=3.0,
                    help="seconds a resumed job trains before its first snapshot (default 3)")
    ap.add_argument("--ranks", type=int, default=0, help="also N trainer processes at once (0: not)")
    ap.add_argument("--rank-mib", type=int, default=256, help="each rank's state (default 256 MiB)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="snapd-growth-") as tmp:
        results, overlap = run(args.mib * MIB, args.snapshots, Path(tmp), args.gap)
        resume = run_resume(args.mib * MIB, Path(tmp), args.first_steps)
        ranks = run_ranks(args.ranks, args.rank_mib * MIB, args.snapshots, Path(tmp)) if args.ranks else None
        if args.ranks:
            ranks.update(run_ranks_resume(args.ranks, args.rank_mib * MIB, Path(tmp), args.first_steps))
    command = "python -m bench.buffer_growth " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, args.mib * MIB, command.strip()) + report_overlap(overlap,
                                                                             args.gap) + report_resume(resume)
    if ranks:
        text += report_ranks(ranks, args.rank_mib * MIB)
    print(text, end="", flush=True)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["rank"]:
    rank_first_snapshot(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
elif __name__ == "__main__":
    sys.exit(main())
