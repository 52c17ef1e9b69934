"""Fine-tuning with a frozen base: ``python -m bench --only incremental``.

A stack of ``--mib`` MiB of frozen fp32 linear weights with a LoRA adapter of rank ``--rank`` on
each, trained by AdamW (only the adapters and their moments change), snapshotted after every step
by each method in turn: snapd through a daemon (raw codec, so that bytes compare with bytes), the
same with ``--incremental off``, ``torch.save`` + fsync and DCP ``async_save``. Per snapshot after
the first: the bytes each method wrote and its time from the call to durable, the median of
``--reps`` steps. Then three snapshots of the state with every tensor changed, through both
daemons: what looking for unchanged chunks costs when there are none. Results:
bench/results/incremental.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.1  # bytes written per snapshot, against the bytes that changed


class FineTuning:
    """The frozen base, the adapters and their optimizer, as one flat ``{key: tensor}`` state."""

    def __init__(self, mib: int, rank: int, width: int = 1024) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        layers = max(1, (mib << 20) // (width * width * 4))
        self.base = [torch.randn(width, width, generator=g) * 0.02 for _ in range(layers)]
        self.a = [torch.nn.Parameter(torch.randn(width, rank, generator=g) * 0.01) for _ in range(layers)]
        self.b = [torch.nn.Parameter(torch.zeros(rank, width)) for _ in range(layers)]
        self.opt = torch.optim.AdamW([*self.a, *self.b], lr=1e-3)
        self.width = width

    def step(self) -> None:
        import torch

        x = torch.randn(4, self.width)
        loss = sum(((x @ w.T + (x @ a) @ b) ** 2).mean() for w, a, b in zip(self.base, self.a, self.b))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def state(self) -> dict:
        out: dict[str, Any] = {f"model.{i}.weight": w for i, w in enumerate(self.base)}
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            out[f"model.{i}.lora_A"], out[f"model.{i}.lora_B"] = a.detach(), b.detach()
        for n, p in enumerate([*self.a, *self.b]):
            for k, v in self.opt.state[p].items():
                out[f"optim.{n}.{k}"] = v
        return out

    def changed_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for k, v in self.state().items()
                   if "lora" in k or "optim" in k)


def written(path: Path) -> int:
    """Bytes of the data files a snapshot wrote itself (a file it shares is not counted)."""
    files = json.loads((Path(path) / "manifest.json").read_text())["files"]
    return sum(f["bytes"] for f in files if "shard" not in f)


def run(args: argparse.Namespace) -> dict:
    from bench.integrations import settle
    from bench.peers import DcpAsync, SnapdDaemon, TorchSave
    import snapd.client as snapd

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="snapd-incremental-"))
    ft = FineTuning(args.mib, args.rank)
    ft.step()
    total = sum(v.numel() * v.element_size() for v in ft.state().values())
    changed = ft.changed_bytes()
    print(f"state {total / 2**20:.0f} MiB, of which {changed / 2**20:.2f} MiB change per step", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    for sub in ("on", "off"):
        (work / sub).mkdir()
    daemons = {"snapd": SnapdDaemon(work / "on", total + (64 << 20), "--codec", "raw", incremental=True),
               "snapd, incremental off": SnapdDaemon(work / "off", total + (64 << 20), "--codec", "raw",
                                                     "--incremental", "off")}
    clients = {name: snapd.connect("ft", endpoint=d.endpoint, spawn=False, keep_last=2)
               for name, d in daemons.items()}
    peers = {"torch.save + fsync": TorchSave(work), "DCP async_save": DcpAsync(work, fastest=False)}
    try:
        for step in range(args.reps + 1):
            ft.step()
            state = ft.state()
            for name, c in clients.items():
                settle()
                t = time.perf_counter()
                info = c.snapshot(state, step=step).wait(timeout=600)
                took = time.perf_counter() - t
                if step:  # (the first snapshot writes everything, whatever the method)
                    results.setdefault(name, {"durable_s": [], "written": []})
                    results[name]["durable_s"].append(took)
                    results[name]["written"].append(written(info.path))
            for name, peer in peers.items():
                settle()
                t = time.perf_counter()
                stored = peer.start(state, step).wait()
                took = time.perf_counter() - t
                if step:
                    results.setdefault(name, {"durable_s": [], "written": []})
                    results[name]["durable_s"].append(took)
                    results[name]["written"].append(stored)
        # what hashing costs when nothing can be shared: every tensor changed, each snapshot
        for k in range(3):
            changed_all = {key: v + (k + 1) for key, v in state.items()}
            for name, c in clients.items():
                settle()
                t = time.perf_counter()
                info = c.snapshot(changed_all, step=args.reps + 1 + k).wait(timeout=600)
                results.setdefault(f"{name}, every byte changed", {"durable_s": [], "written": []})
                results[f"{name}, every byte changed"]["durable_s"].append(time.perf_counter() - t)
                results[f"{name}, every byte changed"]["written"].append(written(info.path))
            del changed_all
    finally:
        for c in clients.values():
            c.close()
        for d in daemons.values():
            d.close()
        for p in peers.values():
            p.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {"state_bytes": total, "changed_bytes": changed, "mib": args.mib, "rank": args.rank,
               "reps": args.reps, "methods": {m: {k: statistics.median(v) for k, v in r.items()}
                                              for m, r in results.items()}, "raw": results}
    write(summary, Path(args.out))
    return summary


def write(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "incremental.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "host": os.uname().nodename, **summary}) + "\n")
    m = summary["methods"]
    snap = m["snapd"]
    lines = [f"# Incremental snapshots: fine-tuning with a frozen base ({summary['state_bytes'] / 2**20:.0f} "
             f"MiB state, {summary['changed_bytes'] / 2**20:.2f} MiB changed per step)", "",
             f"`python -m bench --only incremental --mib {summary['mib']} --reps {summary['reps']}`; "
             f"median of {summary['reps']} snapshots after the first. Goal: snapd writes <= {GOAL}x "
             "the changed bytes.", "",
             "| method | written per snapshot | written / changed | time to durable | snapd's time / this |",
             "|---|---|---|---|---|"]
    for name, r in m.items():
        ratio = r["written"] / summary["changed_bytes"]
        lines.append(f"| {name} | {r['written'] / 2**20:.2f} MiB | {ratio:.2f}x | {r['durable_s']:.3f} s "
                     f"| {snap['durable_s'] / r['durable_s']:.2f}x |")
    (out / "incremental.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench --only incremental",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--mib", type=int, default=1024, help="the frozen base's size")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    return ap


if __name__ == "__main__":
    run(parser().parse_args())
