"""Distributed jobs: ``python -m bench --only distributed`` (or ``python -m bench.distributed``).

1. Two ranks of FSDP2 on the CPU (torchrun, gloo), a model of ``--mib`` MiB with AdamW, snapshot in
   turn through snapd's daemon (``client.snapshot``) and with DCP's ``async_save`` (its default
   stager) on the same state and group: the stall (until the call returns; the state dict is made
   before the clock starts, for each) and the time until the
   snapshot is durable (snapd: its global snapshot committed; DCP: the future done), the slowest
   rank's, median of the repeats; the disk floor for the stored bytes (a probe's durable write
   speed). Then restore: ``snapd.load(into=)`` against ``dcp.load`` on the same 2 ranks and on 1.
2. At scale, simulated: N ranks on up to 32 simulated nodes (a process each, its ranks' small
   parts written by threads through the same commit a daemon makes) against one root: the time
   until the global snapshot is committed, the global manifest's size, and ``ls``, ``load`` and
   DCP's ``read_metadata`` time, for each N.
Results: bench/results/distributed.{jsonl,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 1024  # each layer WIDTH x WIDTH fp32: 4 MiB of weights, 12 MiB with AdamW's moments


def worker(mode: str, layers: int, reps: int, endpoint: str, work: str) -> None:
    """(Each rank of a torchrun job.) ``save``: time snapshots and DCP async saves; ``load``: time
    restores of the last of each. Rank 0 prints the slowest rank's times as one JSON line."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import snapd.client as snapd
    from snapd.dcp import SnapshotWriter

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    for m in model:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()

    def state() -> dict:
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd}

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    out: dict[str, list[float]] = {}
    if mode == "save":
        client = snapd.connect("dist", endpoint=endpoint, spawn=False)
        # the shards move into shared memory once (the registered path): the daemon copies them
        # while training goes on, and the optimizer's step waits for that copy (``guard``)
        client.share(model, opt)
        client.guard(opt)
        writer = SnapshotWriter(client=client)
        for rep in range(reps):
            sd = state()  # (each method's own state dict, made before its clock starts, as DCP's is)
            dist.barrier()
            t0 = time.perf_counter()
            pending = client.snapshot(sd, step=rep + 1)
            stall = time.perf_counter() - t0
            pending.wait()
            durable = time.perf_counter() - t0
            out.setdefault("snapd stall", []).append(slowest(stall))
            out.setdefault("snapd durable", []).append(slowest(durable))
            sd = state()
            dist.barrier()
            t0 = time.perf_counter()
            future = dcp.async_save(sd, checkpoint_id=f"{work}/dcp-{rep}")
            stall = time.perf_counter() - t0
            future.result()
            durable = time.perf_counter() - t0
            out.setdefault("DCP async_save stall", []).append(slowest(stall))
            out.setdefault("DCP async_save durable", []).append(slowest(durable))
            path = f"{client.root}/dist/step-{100 + rep}"  # DCP's async_save again, through snapd's writer
            writer.reset(path)
            sd = state()
            dist.barrier()
            t0 = time.perf_counter()
            future = dcp.async_save(sd, checkpoint_id=path, storage_writer=writer, async_stager=writer)
            stall = time.perf_counter() - t0
            future.result()
            durable = time.perf_counter() - t0
            out.setdefault("SnapshotWriter stall", []).append(slowest(stall))
            out.setdefault("SnapshotWriter durable", []).append(slowest(durable))
        client.close()
    else:
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            snapd.load(f"{work}/root", "dist", into=state())
            out.setdefault("snapd.load(into=)", []).append(slowest(time.perf_counter() - t0))
            dist.barrier()
            t0 = time.perf_counter()
            dcp.load(state(), checkpoint_id=f"{work}/dcp-{reps_saved(work) - 1}")
            out.setdefault("dcp.load", []).append(slowest(time.perf_counter() - t0))
    if dist.get_rank() == 0:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    dist.destroy_process_group()


def reps_saved(work: str) -> int:
    return len([p for p in Path(work).iterdir() if p.name.startswith("dcp-")])


def simulate(root: Path, ranks: int) -> dict[str, float]:
    """``ranks`` ranks on ``nodes`` simulated nodes (a process each, as each node has its daemon,
    its ranks' parts written by threads in it) save small parts of one global snapshot through the
    format's commit: the time from the start signal until every rank has seen it committed, and the
    readers' costs after."""
    from snapd.dcp import SnapshotReader
    from snapd.format import catalog

    nodes = max(1, min(32, ranks // 8))
    go = root / "go"
    root.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.distributed", "node", str(root), str(ranks),
                               str(node), str(nodes)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent) for node in range(nodes)]
    while len(list(root.glob("ready-*"))) < nodes:
        assert all(p.poll() is None for p in procs), "a simulated node died"
        time.sleep(0.05)
    start = time.time()
    go.touch()
    ends = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        assert p.returncode == 0, out
        ends.append(float(out.split()[-1]))
    commit = max(ends) - start
    path = root / "sim" / f"step-{ranks:012d}"
    t0 = time.perf_counter()
    catalog.list_snapshots(root, "sim")
    ls = time.perf_counter() - t0
    t0 = time.perf_counter()
    whole = snapd_load(root, ranks)
    load = time.perf_counter() - t0
    assert whole["w"].shape == (SIM_ROWS * ranks, 64) and whole["w"][-1, 0] == ranks - 1
    t0 = time.perf_counter()
    SnapshotReader(path, rank=0).read_metadata()
    meta = time.perf_counter() - t0
    return {"commit_s": commit, "manifest_bytes": (path / "manifest.json").stat().st_size, "ls_s": ls,
            "load_s": load, "dcp_metadata_s": meta, "nodes": nodes}


SIM_ROWS = 16


def node(root: Path, ranks: int, node: int, nodes: int) -> None:
    """(A simulated node.) Its ranks' parts, each written on a thread once the start signal is
    there; prints when the last of them saw the snapshot committed."""
    from snapd.format.saving import save_leaves
    from snapd.format.tree import flatten
    from snapd.format.writer import Retention

    errors: list[BaseException] = []

    def one(rank: int) -> None:
        state = {"w": np.full((SIM_ROWS, 64), rank, np.float32), "b": np.ones(256, np.float32),
                 "own": np.full(8, rank, np.int64)}
        tree, leaves = flatten(state)
        leaves[0].placement = ((SIM_ROWS * ranks, 64), (SIM_ROWS * rank, 0), True)
        try:
            save_leaves(root, "sim", tree, leaves, step=ranks, metrics={},
                        retention=Retention(keep_last=None), codec="raw", chunk_bytes=4 << 20,
                        shard_bytes=1 << 30, threads=1, emergency=False,
                        rank=rank, world_size=ranks, per_rank=("own",), commit_timeout_s=1200, run="sim")
        except BaseException as e:
            errors.append(e)
            sys.stderr.write(f"simulated rank {rank}: {e!r}\n")
    (root / f"ready-{node}").touch()
    while not (root / "go").exists():
        time.sleep(0.005)
    threads = [threading.Thread(target=one, args=(r,)) for r in range(node, ranks, nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(time.time())


def snapd_load(root: Path, step: int) -> dict:
    import snapd.client as snapd

    return snapd.load(root, "sim", step)


def run(args: argparse.Namespace) -> None:
    from bench.machine import Recorder, describe
    from snapd.daemon.codec_choice import measure_disk
    from snapd.format import catalog

    layers = max(1, args.mib // 12)
    work = Path(tempfile.mkdtemp(prefix="snapd-distributed-", dir=args.dir))
    rec = Recorder(args.out / "distributed.jsonl", describe(work))
    endpoint = f"ipc://{work}/d.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "snapd", "serve", "--root", str(work / "root"),
                               "--endpoint", endpoint, "--host-buffer-bytes", str(64 << 20),
                               "--codec", "raw", "--incremental", "off"],  # (the same state each time)
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from snapd.client.connection import probe

        deadline = time.monotonic() + 30
        while probe(endpoint, 1.0) is None:
            assert time.monotonic() < deadline and daemon.poll() is None, "the daemon did not start"
        times = _torchrun(2, "save", layers, args.reps, endpoint, work)
        daemon.terminate()
        daemon.wait(60)
        stored = catalog.list_snapshots(work / "root", "dist")[-1].stored_bytes
        # (the probe's best of three, each the snapshot's size: a first write to a fresh file system is slow)
        floor = stored / max(measure_disk(work, max(stored, 64 << 20)) for _ in range(3))
        mib = layers * 12
        for method, values in times.items():
            rec.add("distributed", method, f"2 ranks FSDP2, {mib} MiB", values, ranks=2, mib=mib)
        rec.add("distributed", "disk floor", f"{stored} stored bytes", [floor])
        loads = {n: _torchrun(n, "load", layers, args.reps, endpoint, work) for n in (2, 1)}
        for n, t in loads.items():
            for method, values in t.items():
                rec.add("distributed", method, f"restore on {n} rank(s), saved on 2", values, ranks=n,
                        mib=mib)
        sims = {}
        for n in args.simulate:
            sims[n] = simulate(work / f"sim-{n}", n)
            rec.add("distributed_scale", "snapd", f"{n} simulated ranks", [sims[n]["commit_s"]], ranks=n,
                    **{k: v for k, v in sims[n].items() if k != "commit_s"})
        (args.out / "distributed.md").write_text(_markdown(times, floor, loads, sims, mib, rec.machine, args))
        if sims:
            _plot(sims, args.out / "distributed.png")
    finally:
        if daemon.poll() is None:
            daemon.kill()
        rec.close()
        shutil.rmtree(work, ignore_errors=True)


def _torchrun(n: int, mode: str, layers: int, reps: int, endpoint: str, work: Path) -> dict[str, list[float]]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(n), "-m", "bench.distributed",
                          "worker", mode, str(layers), str(reps), endpoint, str(work)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work)}, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def _markdown(times: dict, floor: float, loads: dict, sims: dict, mib: int, machine: dict,
              args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["# Distributed jobs", "",
             f"`python -m bench.distributed --mib {args.mib} --reps {args.reps}` on {machine['cores']} "
             f"cores, commit {machine.get('commit')}. Two ranks of FSDP2 (gloo, CPU), a {mib} MiB model and "
             "AdamW state; seconds, the slowest rank's, median of the repeats.", "",
             "| per snapshot | snapd | DCP async_save | snapd ÷ DCP |", "|---|---|---|---|",
             f"| stall | {med['snapd stall']:.3f} | {med['DCP async_save stall']:.3f} | "
             f"{med['snapd stall'] / med['DCP async_save stall']:.2f}x |",
             f"| until durable | {med['snapd durable']:.3f} | {med['DCP async_save durable']:.3f} | "
             f"{med['snapd durable'] / med['DCP async_save durable']:.2f}x |",
             f"| stall, `async_save` through `snapd.dcp.SnapshotWriter` | {med['SnapshotWriter stall']:.3f} "
             f"| {med['DCP async_save stall']:.3f} | "
             f"{med['SnapshotWriter stall'] / med['DCP async_save stall']:.2f}x |",
             f"| until durable, through the writer | {med['SnapshotWriter durable']:.3f} | "
             f"{med['DCP async_save durable']:.3f} | "
             f"{med['SnapshotWriter durable'] / med['DCP async_save durable']:.2f}x |", "",
             f"Disk floor for the snapshot's stored bytes: {floor:.3f} s (snapd durable = "
             f"{med['snapd durable'] / floor:.2f}x the floor).", "",
             "| restore (saved on 2 ranks) | snapd.load(into=) | dcp.load | snapd ÷ DCP |",
             "|---|---|---|---|"]
    for n, t in loads.items():
        a, b = statistics.median(t["snapd.load(into=)"]), statistics.median(t["dcp.load"])
        lines.append(f"| on {n} rank(s) | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    lines += ["", "At scale, simulated: N ranks on up to 32 nodes (a process each, its ranks on "
              "threads), small parts (a 16x64 fp32 shard, a replicated tensor, a per-rank one) through the "
              "same commit, one root on this machine's disk; commit = from the start until every rank saw "
              "it committed:", "",
              "| ranks | commit (s) | global manifest | ls (s) | load, one process (s) | "
              "DCP read_metadata (s) |",
              "|---|---|---|---|---|---|"]
    for n, s in sims.items():
        lines.append(f"| {n} | {s['commit_s']:.3f} | {s['manifest_bytes'] / 1024:.0f} KiB | "
                     f"{s['ls_s']:.4f} | {s['load_s']:.3f} | {s['dcp_metadata_s']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot(sims: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = list(sims)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("commit_s", "commit (all parts written)"), ("load_s", "load, one process"),
                       ("dcp_metadata_s", "DCP read_metadata"), ("ls_s", "ls")):
        ax.plot(ranks, [sims[n][key] for n in ranks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("simulated ranks")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("snapd global snapshots: cost against the rank count")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=768, help="the model and AdamW state's size")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--simulate", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256, 1024])
    ap.add_argument("--dir", default="/var/tmp", help="where the checkpoints are written (a real disk)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "node":
        node(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        run(parser().parse_args())
