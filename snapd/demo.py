"""``snapd demo``: a daemon plus a small training run that snapshots into it,
is killed, and resumes.

A NumPy two-layer MLP trained with Adam on a synthetic regression task runs
in a child process and calls ``Client.snapshot()`` every ``--every`` steps;
the first call starts a private daemon (``connect(spawn=True)``), or reuses
one already serving the endpoint. The first child SIGKILLs itself mid-run (an
abrupt crash, no cleanup): what it had handed over is still persisted by the
daemon. A second child resumes from the latest snapshot and the loss carries
on. At the end the demo prints the time each snapshot blocked the training
step, against a synchronous ``torch.save`` + fsync of the same state when
torch is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

JOB = "demo"


def init_state(hidden: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    params = {"w1": rng.standard_normal((64, hidden)).astype(np.float32) * 0.1,
              "b1": np.zeros(hidden, np.float32),
              "w2": rng.standard_normal((hidden, 1)).astype(np.float32) / np.sqrt(hidden),
              "b2": np.zeros(1, np.float32)}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    return {"model": params, "optim": {"m": zeros, "v": {k: v.copy() for k, v in zeros.items()}, "t": 0},
            "data_seed": seed + 1, "step": 0}


def train_step(state: dict[str, Any], rng: np.random.Generator, lr: float = 3e-3) -> float:
    p, opt = state["model"], state["optim"]
    x = rng.standard_normal((256, 64)).astype(np.float32)
    y = np.tanh(x[:, :8].sum(axis=1, keepdims=True) / 2)
    h = np.maximum(x @ p["w1"] + p["b1"], 0)
    err = h @ p["w2"] + p["b2"] - y
    grads = {"w2": h.T @ err / len(x), "b2": err.mean(0)}
    dh = (err @ p["w2"].T) * (h > 0)
    grads.update(w1=x.T @ dh / len(x), b1=dh.mean(0))
    opt["t"] += 1
    for k, g in grads.items():  # Adam, in place so snapshots see the live arrays
        opt["m"][k] *= 0.9
        opt["m"][k] += 0.1 * g
        opt["v"][k] *= 0.999
        opt["v"][k] += 0.001 * g * g
        mhat = opt["m"][k] / (1 - 0.9 ** opt["t"])
        vhat = opt["v"][k] / (1 - 0.999 ** opt["t"])
        p[k] -= lr * mhat / (np.sqrt(vhat) + 1e-8)
    return float((err ** 2).mean())


def run_trainer(args: argparse.Namespace) -> int:
    """The child: train, snapshot every ``every`` steps, maybe die abruptly."""
    import snapd.client as client

    c = client.connect(JOB, endpoint=args.endpoint, root=args.root, keep_last=3, host_buffer_bytes=64 << 20)
    try:
        state = c.restore("latest")
        print(json.dumps({"resumed_from": state["step"]}), flush=True)
    except client.SnapshotNotFound:
        state = init_state(args.hidden)
    rng = np.random.default_rng([state["data_seed"], state["step"]])
    while state["step"] < args.steps:
        loss = train_step(state, rng)
        state["step"] += 1
        stall = None
        if state["step"] % args.every == 0:
            pending = c.snapshot(state, step=state["step"], metrics={"loss": loss})
            stall = pending.stall_s
            rng = np.random.default_rng([state["data_seed"], state["step"]])
        print(json.dumps({"step": state["step"], "loss": loss, "stall_s": stall}), flush=True)
        if state["step"] == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
    pending.wait(60)
    c.close()
    return 0


def _child(root: str, endpoint: str, steps: int, every: int, die_at: int, hidden: int) -> list[dict]:
    cmd = [sys.executable, "-m", "snapd.demo", "--trainer", "--root", root, "--endpoint", endpoint,
           "--steps", str(steps), "--every", str(every), "--die-at", str(die_at), "--hidden", str(hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{proc.stderr}")
    return lines


def torch_save_stall(state: dict[str, Any], root: str) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    path = Path(root) / "torch-save.pt"
    t = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def run_demo(args: argparse.Namespace) -> int:
    from snapd.client import list_snapshots, load
    from snapd.client.connection import daemon_status

    root = args.root or tempfile.mkdtemp(prefix="snapd-demo-")
    endpoint = args.endpoint or f"ipc://{root}/snapd.sock"
    mib = sum(v.nbytes for v in init_state(args.hidden)["model"].values()) * 3 / 2**20
    print(f"snapshots go to {root}/{JOB}/ through the daemon at {endpoint} (state {mib:.1f} MiB with Adam "
          "moments)")
    first = _child(root, endpoint, args.steps, args.every, args.die_at, args.hidden)
    steps = [r for r in first if "step" in r]
    print(f"run 1: trained to step {steps[-1]['step']} (loss {steps[0]['loss']:.4f} -> "
          f"{steps[-1]['loss']:.4f}), then was killed with SIGKILL")
    second = _child(root, endpoint, args.steps, args.every, -1, args.hidden)
    resumed = next(r["resumed_from"] for r in second if "resumed_from" in r)
    steps2 = [r for r in second if "step" in r]
    before = next(r["loss"] for r in steps if r["step"] == resumed)
    print(f"run 2: resumed from step {resumed} (loss at step {resumed}: {before:.4f}); loss at step "
          f"{steps2[0]['step']}: {steps2[0]['loss']:.4f}; finished at step {steps2[-1]['step']} with loss "
          f"{steps2[-1]['loss']:.4f}")
    print("snapshots on disk: " + ", ".join(f"{s.step}{' (latest)' if s.latest else ''}"
                                            for s in list_snapshots(root, JOB)))
    stalls = [r["stall_s"] for r in steps + steps2 if r.get("stall_s") is not None]
    final = load(root, JOB)
    ref = torch_save_stall(final, root)
    med = sorted(stalls)[len(stalls) // 2]
    line = f"training blocked per snapshot: median {med * 1e3:.2f} ms over {len(stalls)} snapshots"
    if ref is not None:
        line += f"; torch.save + fsync of the same state: {ref * 1e3:.1f} ms ({ref / med:.0f}x longer)"
    print(line)
    if not args.endpoint:  # the private daemon would exit once idle; stop it now
        _stop(daemon_status(endpoint)["pid"])
    ok = resumed > 0 and steps2[-1]["step"] == args.steps and final["step"] == args.steps
    if args.root is None and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root} (snapd demo --keep leaves it)")
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


def _stop(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the private daemon and wait until it has drained and exited."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapd demo", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("--root", help="snapshot root (default: a new temporary directory, removed at the end)")
    ap.add_argument("--endpoint", help="daemon endpoint (default: a private daemon at ROOT/snapd.sock)")
    ap.add_argument("--steps", type=int, default=300, help="training steps in all (default 300)")
    ap.add_argument("--every", type=int, default=25, help="snapshot every N steps (default 25)")
    ap.add_argument("--die-at", type=int, default=140,
                    help="the first run kills itself at this step (default 140)")
    ap.add_argument("--hidden", type=int, default=4096,
                    help="the MLP's hidden width: the state's size (default 4096)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary snapshot root at the end")
    ap.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 0 < args.every <= args.die_at < args.steps and not args.trainer:
        ap.error("need 0 < --every <= --die-at < --steps")
    return run_trainer(args) if args.trainer else run_demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
