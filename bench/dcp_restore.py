"""Restore through DCP on another world size: ``python -m bench.dcp_restore``.

One process saves a model and its AdamW state (fp32) with snapd (raw, and shuffle-zstd) and with
DCP's own ``dcp.save``; then ``torchrun`` jobs of 1 and 2 ranks shard the same model with FSDP2
and ``dcp.load`` it, through ``snapd.dcp.SnapshotReader`` and through DCP's ``FileSystemReader``,
alternately, from the page cache. Reported: seconds until every rank has loaded (the slowest
rank), median over repeats. Results: bench/results/dcp-restore.{jsonl,md}.
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
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 1024  # each layer is WIDTH x WIDTH fp32: 4 MiB of weights, 12 MiB with AdamW's moments


def _model(layers: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])


def _trained_state(layers: int) -> dict:
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _model(layers)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def worker(layers: int, paths: list[str], reps: int) -> None:
    """(Each rank of a torchrun job.) Time dcp.load through each reader; rank 0 prints the slowest
    rank's times as JSON."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from snapd.dcp import SnapshotReader

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model(layers)
    for m in model:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(reps):
        for p in paths:
            reader = dcp.FileSystemReader(p) if p.endswith("dcp") else SnapshotReader(p)
            dist.barrier()
            t0 = time.perf_counter()
            dcp.load(state, storage_reader=reader)
            took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            times[p].append(float(took))
    if dist.get_rank() == 0:
        sys.stdout.write(json.dumps(times) + "\n")
        sys.stdout.flush()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=768, help="the state's size (weights and AdamW's moments)")
    ap.add_argument("--ranks", default="1,2", help="world sizes to load on, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the checkpoints are written (a real disk)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import snapd.client as snapd
    import torch.distributed.checkpoint as dcp
    from bench.machine import Recorder, describe

    layers = max(1, args.mib // 12)
    work = Path(tempfile.mkdtemp(prefix="snapd-dcp-restore-", dir=args.dir))
    rec = Recorder(args.out / "dcp-restore.jsonl", describe(work))
    try:
        state = _trained_state(layers)
        paths = {}
        for codec in ("raw", "shuffle-zstd"):
            info = snapd.save(work / "root", codec, state, step=1, codec=codec)
            paths[f"snapd reader ({codec})"] = str(info.path)
        dcp.save(state, checkpoint_id=work / "dcp", no_dist=True)
        paths["DCP FileSystemReader"] = str(work / "dcp")
        del state
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        table = []
        for n in (int(r) for r in args.ranks.split(",")):
            command = [torchrun, "--standalone", "--nproc-per-node", str(n), "-m", "bench.dcp_restore",
                       "worker", str(layers), str(args.reps), *paths.values()]
            out = subprocess.run(command,
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work)},
                                 timeout=3600)
            if out.returncode != 0:
                raise RuntimeError(out.stdout + out.stderr)
            times = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
            row = {}
            for method, p in paths.items():
                rec.add("dcp_restore", method, f"dcp.load on {n} rank(s), {layers * 12} MiB", times[p],
                        ranks=n, mib=layers * 12)
                row[method] = statistics.median(times[p])
            table.append((n, row))
        (args.out / "dcp-restore.md").write_text(_markdown(table, layers * 12, rec.machine, args))
    finally:
        rec.close()
        shutil.rmtree(work, ignore_errors=True)


def _markdown(table: list, mib: int, machine: dict, args: argparse.Namespace) -> str:
    methods = list(table[0][1])
    lines = ["# Restore through DCP on another world size", "",
             f"`python -m bench.dcp_restore --mib {args.mib} --ranks {args.ranks} --reps {args.reps}` on "
             f"{machine['cores']} cores, commit {machine.get('commit')}: a {mib} MiB fp32 model and AdamW "
             "state saved by one process, loaded by FSDP2 on each world size with `dcp.load`, from the page "
             "cache; seconds until the slowest rank has loaded, median of the repeats.", "",
             "| ranks | " + " | ".join(methods) + " | snapd raw ÷ DCP |",
             "|---|" + "---|" * (len(methods) + 1)]
    for n, row in table:
        ratio = row["snapd reader (raw)"] / row["DCP FileSystemReader"]
        lines.append(f"| {n} | " + " | ".join(f"{row[m]:.3f}" for m in methods) + f" | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), sys.argv[4:], int(sys.argv[3]))
    else:
        main()
