"""The trainer's stall against the number of tensors: ``python -m bench.stall_scaling``.

What ``snapshot()`` costs beyond copying bytes: flattening the state, describing each tensor, the
messages. The tensors are small (16 KiB each by default), so that per-tensor costs, not memcpy,
make the stall; a model with AdamW has about three tensors per parameter, thousands for an LLM.
Each state is saved by snapd plain (the trainer copies into the daemon's buffer), snapd
registered (after ``share()``: descriptors only, the message flow of the GPU path), torch.save +
fsync and DCP async_save (default; its stall lasts until staging ends), in the same run; every
save is waited to durable before the next, so no method is slowed by its own backlog. The state
carries a changing step counter as a real one would. ``--state module`` snapshots what a trainer
really hands over instead: ``model.state_dict()`` and AdamW's ``optimizer.state_dict()``, made anew
for every snapshot (new tensor objects over the same memory; AdamW keeps four tensors a parameter,
its step counters CPU scalars). Results: bench/results/stall-scaling[-module][-cuda].{jsonl,md}.
``--device cuda`` puts the state on the GPU and measures snapd's CUDA IPC path instead (the issue's
target: a stall of at most 2 ms whatever the size).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.machine import Recorder, describe
from bench.peers import DcpAsync, Snapd, SnapdDaemon, TorchSave
from bench.report import markdown

RESULTS = Path(__file__).resolve().parent / "results"


def _state(n: int, numel: int, device: str) -> dict:
    g = torch.Generator().manual_seed(n)
    return {f"model.layers.{i // 3}.{('weight', 'exp_avg', 'exp_avg_sq')[i % 3]}":
            torch.randn(numel, generator=g).to(device) for i in range(n)}


class _Params(torch.nn.Module):
    def __init__(self, n: int, numel: int, device: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(n)
        for i in range(n):
            self.register_parameter(f"layers_{i}",
                                    torch.nn.Parameter(torch.randn(numel, generator=g).to(device)))


def _module_state(n: int, numel: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A module and an AdamW holding about ``n`` tensors in all (a quarter of them parameters)."""
    model = _Params(max(1, n // 4), numel, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the optimizer's state exists from its first step
    return model, opt


def _states(kind: str, n: int, numel: int, device: str, method: object) -> Callable[[int], dict]:
    """What the trainer hands over at each step (shared first, for snapd registered)."""
    registered = getattr(method, "registered", False)
    if kind == "module":
        model, opt = _module_state(n, numel, device)
        if registered:
            method.share(model, opt)
        return lambda step: {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
    state = _state(n, numel, device)
    if registered:
        method.share(state)
    return lambda step: {**state, "step": step}


def _measure(method: object, make: Callable[[int], dict], reps: int) -> list[float]:
    stalls = []
    for step in range(reps + 2):  # two warm-up saves: buffers touched, layouts sent, DCP's first plan
        s = make(step)
        t = time.perf_counter()
        handle = method.start(s, step)
        took = time.perf_counter() - t
        handle.wait()
        if step >= 2:
            stalls.append(took)
    return stalls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stall_scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="16,64,256,1024", help="tensor counts, comma-separated")
    ap.add_argument("--tensor-bytes", type=int, default=16 << 10)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dir", default="/var/tmp", help="where the checkpoints are written (a real disk)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--state", choices=("dict", "module"), default="dict",
                    help="dict: a dict of tensors; module: model.state_dict() and AdamW's state_dict(), "
                         "made anew "
                    "for every snapshot")
    ap.add_argument("--device", default="cpu", help="cuda: the state on the GPU, snapd by CUDA IPC "
                    "(its daemon on the CUDA backend) against the same peers")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="snapd-stall-"))
    gpu = args.device != "cpu"
    stem = "stall-scaling" + ("-module" if args.state == "module" else "") + ("-cuda" if gpu else "")
    machine = describe(work)
    if gpu:
        machine["gpu"] = torch.cuda.get_device_name()
    rec = Recorder(args.out / f"{stem}.jsonl", machine)
    numel = args.tensor_bytes // 4
    daemon = SnapdDaemon(work, max(counts) * (args.tensor_bytes + 64) + (1 << 20),
                         *(["--backend", "cuda"] if gpu else []))
    snapds = [(lambda n: Snapd(daemon, f"ipc-{n}"), "snapd (CUDA IPC)")] if gpu else [
        (lambda n: Snapd(daemon, f"plain-{n}"), "snapd plain"),
        (lambda n: Snapd(daemon, f"registered-{n}", registered=True), "snapd registered")]
    try:
        for n in counts:
            metric = f"stall, {n} tensors of {args.tensor_bytes >> 10} KiB" + (
                " (model + AdamW state_dict)" if args.state == "module" else "")
            for make, name in [(lambda n: TorchSave(work), "torch.save + fsync"),
                               (lambda n: DcpAsync(work, fastest=False), "DCP async_save (default)"),
                               *snapds]:
                method = make(n)
                method.name = name
                step_state = _states(args.state, n, numel, args.device, method)
                stalls = _measure(method, step_state, args.reps)
                rec.add("stall_scaling", method.name, metric, [x * 1e3 for x in stalls], unit="ms", tensors=n,
                        tensor_bytes=args.tensor_bytes, state=args.state)
                print(f"{n:5d} tensors  {method.name:28s} stall median "
                      f"{statistics.median(stalls) * 1e3:8.2f} ms", flush=True)
                method.close()
    finally:
        daemon.close()
        rec.close()
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench.stall_scaling " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / f"{stem}.md").write_text(markdown(rec.rows, rec.machine, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
