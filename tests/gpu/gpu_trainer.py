"""A training process on the GPU path, run as a subprocess by tests/gpu/test_ipc.py.

``python gpu_trainer.py MODE ENDPOINT ROOT``; prints ``OK`` and exits 0 when
everything it checks holds, else raises. Modes:
- ``dtypes``: every dtype, odd sizes, sub-blocks of one allocation at odd
  offsets, a transposed tensor; loaded back on the CPU and onto the GPU.
- ``mutate``: 256 MiB of state; right after ``fence()`` the trainer changes
  every tensor on its stream: the snapshot must hold the values from before.
- ``identical``: the snapshot the daemon wrote (codec from the daemon's
  flags) has the same chunk checksums as an in-process save of the same values.
- ``cupy``: CuPy arrays (no torch): back as CuPy arrays on the device, and as
  NumPy with device="cpu".
- ``loop``: a model and AdamW on the GPU, ``guard(optimizer)``, a snapshot of
  ``state_dict()``s after every step: all but the first replay the layout's
  memo (CPU step counters inline beside the device tensors), each step
  restores exactly, also into a new model's device tensors (``into=``); then
  the model is made anew in freed memory (the same addresses, new
  allocations): restored exactly. Prints how many snapshots were flattened.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

import snapd.client as snapd


def torch_state(torch, big: bool = False) -> dict:
    g = torch.Generator(device="cuda").manual_seed(7)
    dev = "cuda"
    if big:
        return {f"layer{i}": torch.randn(16 << 20, generator=g, device=dev) for i in range(4)}
    slab = torch.randn(1 << 20, generator=g, device=dev)  # one allocation, several tensors in it
    return {
        "model": {"w": torch.randn(513, 257, generator=g, device=dev),
                  "b": torch.randn(7, generator=g, device=dev, dtype=torch.float64),
                  "bf16": torch.randn(4097, generator=g, device=dev).to(torch.bfloat16),
                  "half": torch.randn(3, 5, generator=g, device=dev).half(),
                  "ids": torch.randint(0, 1000, (1001,), generator=g, device=dev),
                  "mask": torch.rand(999, generator=g, device=dev) > 0.5,
                  "i8": torch.randint(-100, 100, (77,), generator=g, device=dev, dtype=torch.int8),
                  "c64": torch.randn(33, generator=g, device=dev, dtype=torch.complex64),
                  "empty": torch.zeros(0, device=dev)},
        "views": {"a": slab[3:100_003], "b": slab[200_001:600_000], "t": torch.randn(64, 48, generator=g,
                                                                                      device=dev).t()},
        "cpu": {"np": np.arange(10, dtype=np.int32), "t": torch.arange(5.0)}, "step": 3,
    }


def leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif hasattr(tree, "shape"):
        yield prefix.rstrip("."), tree


def host_bytes(t) -> bytes:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    if type(t).__module__.startswith("cupy"):
        return t.get().tobytes()
    return np.ascontiguousarray(t).tobytes()


def check_equal(want: dict, got, where: str) -> None:
    got = dict(leaves(got))
    for key, w in want.items():
        assert key in got, f"{where}: {key} missing"
        assert host_bytes(got[key]) == w, f"{where}: {key} differs"


def training_loop(client, torch) -> None:
    from snapd.client import snapshot_plan

    flattens = []
    real = snapshot_plan.flattened
    snapshot_plan.flattened = lambda *a, **k: flattens.append(1) or real(*a, **k)
    torch.manual_seed(5)

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024),
                                    torch.nn.Linear(1024, 333)).cuda()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(model, opt) -> None:
        opt.zero_grad()
        model(torch.randn(64, 256, device="cuda")).square().mean().backward()
        opt.step()  # guarded: its kernels wait (on the GPU) for the daemon's copy of the last snapshot

    def state(model, opt, step):
        return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                "lr": opt.param_groups[0]["lr"]}

    model, opt = make()
    client.guard(opt)
    train(model, opt)
    assert opt.state_dict()["state"][0]["step"].device.type == "cpu"  # Adam's counters: CPU scalars
    taken = []
    for step in range(6):
        train(model, opt)
        if step == 4:
            opt.param_groups[0]["lr"] = 5e-4
        s = state(model, opt, step)
        taken.append((client.snapshot(s, step=step), {k: host_bytes(v) for k, v in leaves(s)}, s["lr"]))
    assert len(flattens) == 1, f"{len(flattens)} of 6 snapshots flattened; only the first should be"
    [mine] = [cl for cl in client.status()["clients"] if cl["pid"] == os.getpid()]
    for pending, want, lr in taken:
        pending.wait()
        back = client.restore(pending.step)
        check_equal(want, back, f"step {pending.step}")
        assert back["step"] == pending.step and back["lr"] == lr, (back["step"], back["lr"])
    check_equal(taken[-1][1], client.restore(device="cuda:0"), "last step onto the device")
    fresh, _ = make()  # resuming: the model's own device tensors filled in place
    client.restore(taken[-1][0].step, keys="model", into={"model": fresh.state_dict()})
    assert all(p.is_cuda for p in fresh.parameters())
    check_equal({k: v for k, v in taken[-1][1].items() if k.startswith("model.")},
                {"model": fresh.state_dict()}, "into a model on the device")
    del fresh

    addresses = {k: v.data_ptr() for k, v in model.state_dict().items()}
    del model, opt, s, taken
    # the allocations go back to the driver, but for one the daemon still maps (the client holds a
    # tensor of it until snapshot 10 is copied: CUDA leaves freeing mapped memory undefined)
    torch.cuda.empty_cache()
    model, opt = make()
    client.guard(opt)
    train(model, opt)
    s = state(model, opt, 10)
    reused = sum(addresses[k] == v.data_ptr() for k, v in model.state_dict().items())
    want = {k: host_bytes(v) for k, v in leaves(s)}
    client.snapshot(s, step=10).wait()
    check_equal(want, client.restore(10), "a model made anew")
    print(json.dumps({"flattened": len(flattens), "snapshots": 7, "addresses_reused": reused,
                      "last_snapshot": mine["last_snapshot"]}), flush=True)


def run(mode: str, endpoint: str, root: str) -> None:
    client = snapd.connect(mode, endpoint=endpoint, spawn=False, keep_last=None)
    if mode == "cupy":
        import cupy as cp  # and no torch: the client must not need it

        cp.random.seed(3)
        state = {"w": cp.random.standard_normal((300, 301), dtype=cp.float32),
                 "n": cp.arange(12345, dtype=cp.int64), "t": cp.random.standard_normal((40, 30)).T}
        want = {k: host_bytes(cp.ascontiguousarray(v)) for k, v in state.items()}
        client.snapshot(state, step=1).wait()
        back = client.restore()
        assert all(type(v).__module__.startswith("cupy") for v in back.values()), back
        check_equal(want, back, "cupy on device")
        check_equal(want, client.restore(device="cpu"), "cupy as numpy")
        print("OK")
        return
    import torch

    if mode == "loop":
        training_loop(client, torch)
        client.close()
        print("OK")
        return
    state = torch_state(torch, big=mode == "mutate")
    want = {k: host_bytes(v) for k, v in leaves(state)}
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in want.items()}
    Path(root).parent.joinpath(f"expect-{mode}.json").write_text(json.dumps(digests))
    pending = client.snapshot(state, step=1)
    print(json.dumps({"stall_s": pending.stall_s, "copied_at_return": pending.copied}), flush=True)
    if mode == "mutate":
        if not os.environ.get("GPU_TRAINER_SKIP_FENCE"):  # set only to show the test can fail
            client.fence()
        for t in state.values():
            t.add_(1.0)  # queued on the trainer's stream right away; the GPU runs it after the copy
    pending.wait()
    check_equal(want, client.restore(), "cpu")
    on_gpu = client.restore(device="cuda:0")
    assert all(t.device.type == "cuda" for _, t in leaves(on_gpu) if isinstance(t, torch.Tensor)), \
        "device restore left torch tensors on the host"
    check_equal(want, on_gpu, "cuda")
    if mode == "identical":
        from snapd.format.manifest import MANIFEST_NAME

        codec = json.loads((pending.wait().path / MANIFEST_NAME).read_text())["codec"]
        info = snapd.save(root + "-cpu", mode, state, step=1, codec=codec)
        a = json.loads((pending.wait().path / MANIFEST_NAME).read_text())
        b = json.loads((Path(info.path) / MANIFEST_NAME).read_text())
        chunks = [[t["chunks"] for t in m["tensors"]] for m in (a, b)]
        assert chunks[0] == chunks[1], "stored bytes differ"
        print(f"codec {codec}: identical chunks", flush=True)
    client.close()
    print("OK")


if __name__ == "__main__":
    # A hang (a copy that never completes, an event never recorded) prints every thread's stack and
    # exits, so that the test shows where, with the daemon's log, instead of running out its time.
    faulthandler.dump_traceback_later(float(os.environ.get("GPU_TRAINER_TRACE_AFTER_S", "120")), exit=True)
    run(*sys.argv[1:4])
