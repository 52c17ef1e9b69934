"""The frameworks' checkpointing against snapd's integrations: ``python -m bench --only integrations``.

The training stall per checkpoint (how long the call that saves keeps the training loop), the
same state and process for both, one run, the median of ``--reps``:
- DCP: ``dcp.async_save`` with its default writer and stager, against ``snapd.dcp.SnapshotWriter``
  as writer and stager (the state copied into the daemon's buffer; and shared with it once by
  ``client.share``, where only descriptors travel);
- Lightning: ``trainer.save_checkpoint`` with ``TorchCheckpointIO`` (the default) and
  ``AsyncCheckpointIO``, against ``SnapdCheckpointIO``;
- the Hugging Face Trainer: its own save of a checkpoint (``_save_checkpoint``, what ``save_steps``
  runs), against ``SnapdCallback`` at a save step.
Each framework runs in its own process, outside snapd's clone (its ``kernels/`` folder would hide
the package transformers imports by that name). Results: bench/results/integrations.{jsonl,md}.
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
GOAL = 0.1


def model(mib: int):
    """An MLP whose parameters take ``mib / 3`` MiB (AdamW's two moments make the state ``mib``)."""
    import torch

    width = 1024
    layers = max(1, (mib << 20) // 3 // (width * width * 4))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def settle() -> None:
    """Between two measurements: the last save's dirty pages written out, so that the next one does
    not pay for them (whichever method wrote them)."""
    os.sync()
    time.sleep(0.2)


class Stalls(dict):
    """Seconds per method, in the order measured."""

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, method: str) -> None:
        self.setdefault(method, []).append(time.perf_counter() - self._t0)


def bench_dcp(endpoint: str, work: Path, mib: int, reps: int) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp

    import snapd.client as snapd
    from snapd.dcp import SnapshotWriter

    m = model(mib)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 1024)).sum().backward()
    opt.step()
    client = snapd.connect("dcp-bench", endpoint=endpoint, spawn=False, keep_last=2)
    writer = SnapshotWriter(client=client)
    out = Stalls()
    for rep in range(2 * reps):
        shared = rep >= reps
        if rep == reps:  # the tensors move into shared memory once: snapshots send descriptors
            client.share(m, opt)
            client.guard(opt)
        sd = {"model": m.state_dict(), "optim": opt.state_dict()}
        if not shared:
            out.start()
            fut = dcp.async_save(sd, checkpoint_id=str(work / f"dcp-{rep}"), no_dist=True)
            out.stop("DCP async_save (default)")
            fut.result()
            settle()
        path = f"{client.root}/dcp-bench/step-{rep}"
        writer.reset(path)
        out.start()
        fut = dcp.async_save(sd, checkpoint_id=path, storage_writer=writer, async_stager=writer, no_dist=True)
        out.stop("snapd SnapshotWriter, shared" if shared else "snapd SnapshotWriter")
        fut.result()
        settle()
    client.close()
    return out


def bench_lightning(endpoint: str, work: Path, mib: int, reps: int) -> dict:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
    from torch.utils.data import DataLoader, TensorDataset

    from snapd.integrations.lightning import SnapdCheckpointIO

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model(mib)

        def training_step(self, batch, i):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    data = DataLoader(TensorDataset(torch.randn(4, 1024)), batch_size=2)
    ios = {"Lightning TorchCheckpointIO (default)": TorchCheckpointIO(),
           "Lightning AsyncCheckpointIO": AsyncCheckpointIO(TorchCheckpointIO()),
           "snapd SnapdCheckpointIO": SnapdCheckpointIO("lightning-bench", endpoint=endpoint, spawn=False)}
    trainers = {}
    for name, io in ios.items():
        trainers[name] = pl.Trainer(max_steps=1, plugins=[io], logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
        trainers[name].fit(Module(), data)
    out = Stalls()
    for rep in range(reps):
        for i, (name, trainer) in enumerate(trainers.items()):
            out.start()
            trainer.save_checkpoint(work / f"l{i}-{rep}.ckpt")  # (a file of its own: replacing another
            # method's would make this one pay for deleting it)
            out.stop(name)
            io = ios[name]
            io.wait() if isinstance(io, SnapdCheckpointIO) else io.teardown()  # (the save finishes)
            settle()
    ios["snapd SnapdCheckpointIO"].teardown()
    return out


def bench_hf(endpoint: str, work: Path, mib: int, reps: int) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from snapd.integrations.hf import SnapdCallback

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model(mib)

        def forward(self, x, labels=None):
            return {"loss": self.net(x).square().mean()}

    data = [{"x": torch.randn(1024)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(work / "hf"), max_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, per_device_train_batch_size=2)
    trainer = Trainer(model=Wrapped(), args=args, train_dataset=data)
    trainer.train()
    out = Stalls()
    callback = SnapdCallback("hf-bench", endpoint=endpoint, spawn=False)
    for rep in range(2 * reps):
        if rep == reps:  # the same, the model and optimizer shared with the daemon
            callback.close()
            callback = SnapdCallback("hf-bench", endpoint=endpoint, spawn=False, share=True)
        trainer.state.global_step = rep + 1
        if rep < reps:
            out.start()
            trainer._save_checkpoint(trainer.model, trial=None)  # what the Trainer runs at a save step
            out.stop("HF Trainer's own save")
            settle()
        trainer.control.should_save = True
        out.start()
        callback.on_step_end(args, trainer.state, trainer.control, model=trainer.model,
                             optimizer=trainer.optimizer, lr_scheduler=trainer.lr_scheduler)
        out.stop("snapd SnapdCallback(share=True)" if callback.share else "snapd SnapdCallback")
        for p in callback._pending:
            p.wait()
        settle()
    callback.close()
    return out


FRAMEWORKS = {"dcp": (bench_dcp, "DCP async_save (default)"),
              "lightning": (bench_lightning, "Lightning TorchCheckpointIO (default)"),
              "hf": (bench_hf, "HF Trainer's own save")}


def run(args: argparse.Namespace) -> None:
    from bench.machine import Recorder, describe
    from snapd.client.connection import probe

    work = Path(tempfile.mkdtemp(prefix="snapd-integrations-", dir=args.dir))
    rec = Recorder(args.out / "integrations.jsonl", describe(work))
    endpoint = f"ipc://{work}/d.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "snapd", "serve", "--root", str(work / "root"),
                               "--endpoint", endpoint, "--incremental", "off"],  # (the same state each time)
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        deadline = time.monotonic() + 30
        while probe(endpoint, 1.0) is None:
            assert time.monotonic() < deadline and daemon.poll() is None, "the daemon did not start"
        for fw in args.frameworks:
            # (by its path, from the work directory: neither puts snapd's clone on sys.path)
            p = subprocess.run([sys.executable, __file__, "one", fw, endpoint, str(work), str(args.mib),
                                str(args.reps)], capture_output=True, text=True, cwd=work, timeout=1800)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            results[fw] = json.loads(p.stdout.strip().splitlines()[-1])
            for method, values in results[fw].items():
                rec.add("integrations", method, f"{fw}, {args.mib} MiB of state", values)
        (args.out / "integrations.md").write_text(_markdown(results, args, rec.machine))
    finally:
        daemon.terminate()
        daemon.wait(60)
        rec.close()
        shutil.rmtree(work, ignore_errors=True)


def _markdown(results: dict, args: argparse.Namespace, machine: dict) -> str:
    lines = ["# Integrations: the training stall per checkpoint", "",
             f"`python -m bench.integrations --mib {args.mib} --reps {args.reps}` on {machine['cores']} "
             f"cores, commit {machine.get('commit', '?')}. An MLP and AdamW ({args.mib} MiB of state) in one "
             "process, CPU; seconds the call that saves keeps the training loop, median of the repeats; "
             f"goal: at most {GOAL}x the framework's default.", "",
             "| framework | method | stall (s) | ÷ the framework's default |", "|---|---|---|---|"]
    for fw, times in results.items():
        base = statistics.median(times[FRAMEWORKS[fw][1]])
        for method, values in times.items():
            med = statistics.median(values)
            lines.append(f"| {fw} | {method} | {med:.3f} | {med / base:.2f}x |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=384, help="the state's size: parameters and AdamW's moments")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frameworks", type=lambda s: s.split(","), default=list(FRAMEWORKS))
    ap.add_argument("--dir", default="/var/tmp", help="where the checkpoints are written (a real disk)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        fw, endpoint, work, mib, reps = sys.argv[2:7]
        times = FRAMEWORKS[fw][0](endpoint, Path(work), int(mib), int(reps))
        sys.stdout.write(json.dumps(times) + "\n")
    else:
        run(parser().parse_args())
