"""``python -m bench [--quick]``: snapd against torch.save, PyTorch DCP (save, async_save
default and fastest) and safetensors, on the same state in the same run.

Writes ``results.jsonl`` (one line per measurement, with the machine),
``results.md`` (medians, min-max, snapd as a ratio to each peer) and PNG plots
to ``--out``. ``--quick`` shrinks every scenario so that the whole harness runs
in under two minutes on 2 cores (CI runs it; it checks outputs, never timings).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
SCENARIOS = ("stall", "durable", "concurrency", "compression", "restore", "emergency")
# only when asked for (bench/distributed.py, remote.py, integrations.py, incremental.py, recovery.py)
SEPARATE = ("distributed", "remote", "integrations", "incremental", "recovery")
SEPARATE_QUICK = {"distributed": ["--mib", "24", "--reps", "1", "--simulate", "4,16"],
                  "remote": ["--mib", "16", "--reps", "1"], "integrations": ["--mib", "24", "--reps", "1"],
                  "incremental": ["--mib", "16", "--reps", "1"], "recovery": ["--mib", "16", "--reps", "1"]}
PLANS = {
    "full": {"model": "full", "steps": 12, "every": 3, "sizes": [256 * MIB, 1024 * MIB, 4096 * MIB],
             "concurrency": [1, 2, 4], "conc_bytes": 256 * MIB, "emergency_bytes": 1024 * MIB,
             "comp_limit": 256 * MIB, "repeats": 3},
    "quick": {"model": "quick", "steps": 4, "every": 2, "sizes": [16 * MIB], "concurrency": [1, 2],
              "conc_bytes": 8 * MIB, "emergency_bytes": 16 * MIB, "comp_limit": 8 * MIB, "repeats": 2},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the harness, not the numbers")
    ap.add_argument("--out", type=Path,
                    help="where results go (default bench/results, or bench/results-quick)")
    ap.add_argument("--dir", default="/var/tmp", help="where the checkpoints are written (a real disk)")
    ap.add_argument("--only", action="append", choices=SCENARIOS + SEPARATE,
                    help="run only these scenarios (repeatable)")
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args(argv)
    plan = dict(PLANS["quick" if args.quick else "full"])
    if args.repeats:
        plan["repeats"] = args.repeats
    here = Path(__file__).resolve().parent
    out = args.out or here / ("results-quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    for name in SEPARATE:  # each its own module, run alone
        if name in (args.only or []):
            mod = importlib.import_module(f"bench.{name}")
            mod.run(mod.parser().parse_args(["--dir", args.dir, "--out", str(out)] + (
                SEPARATE_QUICK[name] if args.quick else []) + (
                ["--reps", str(args.repeats)] if args.repeats else [])))
            args.only.remove(name)
            if not args.only:
                return 0
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="snapd-bench-"))
    command = "python -m bench" + (" --quick" if args.quick else "") + \
        "".join(f" --only {s}" for s in args.only or [])
    from bench import compression, durable, emergency, restore, training
    from bench.machine import Recorder, describe
    from bench.peers import DcpAsync, DcpSave, Safetensors, Snapd, SnapdDaemon, TorchSave
    from bench.report import markdown, plots

    machine = describe(work)
    rec = Recorder(out / "results.jsonl", machine)
    only = set(args.only or SCENARIOS)
    t0 = time.perf_counter()
    try:
        trainer = training.Trainer(plan["model"])
        print(f"trainer state {trainer.nbytes() / MIB:.0f} MiB; work in {work}", flush=True)
        if "stall" in only:
            daemon = SnapdDaemon(work, trainer.nbytes() + 16 * MIB)
            try:
                peers = [TorchSave(work), Safetensors(work), DcpSave(work), DcpAsync(work, fastest=False),
                         DcpAsync(work, fastest=True)]
                training.run(trainer, peers, rec, plan["steps"], plan["every"])
                for p in peers:
                    p.close()
                plain = Snapd(daemon, "stall-plain")
                training.run(trainer, [plain], rec, plan["steps"], plan["every"])
                plain.close()
                reg = Snapd(daemon, "stall-registered", registered=True)
                reg.share(trainer.model, trainer.opt)
                reg.client.guard(trainer.opt)  # only a step that would race the daemon's copy waits
                training.run(trainer, [reg], rec, plan["steps"], plan["every"])
                reg.close()
            finally:
                daemon.close()
        if "compression" in only:
            moments = [v.detach().numpy().reshape(-1) for k, v in trainer.state().items()
                       if k.endswith(("exp_avg", "exp_avg_sq"))]
            compression.run(moments, rec, plan["comp_limit"])
        if "restore" in only:
            restore.run(trainer.state(), "model.blocks.layers.0.", work, rec, plan["repeats"])
        del trainer
        if "durable" in only:
            durable.run_sizes(plan["sizes"], work, rec, plan["repeats"])
        if "concurrency" in only:
            durable.run_concurrency(plan["concurrency"], plan["conc_bytes"], work, rec, plan["repeats"])
        if "emergency" in only:
            daemon = SnapdDaemon(work, plan["emergency_bytes"] + 16 * MIB)
            try:
                emergency.run(plan["emergency_bytes"], work, daemon.endpoint, daemon.root, rec,
                              plan["repeats"])
            finally:
                daemon.close()
    finally:
        rec.close()
        shutil.rmtree(work, ignore_errors=True)
    (out / "results.md").write_text(markdown(rec.rows, machine, command))
    made = plots(rec.rows, out)
    print(f"done in {time.perf_counter() - t0:.0f} s: {out / 'results.jsonl'}, {out / 'results.md'}, "
          + ", ".join(p.name for p in made), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
