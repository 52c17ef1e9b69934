"""``accelerate_job.py MODE ENDPOINT OUT_DIR``: an Accelerate training loop (CPU) of 9 steps over a
small MLP with dropout, AdamW and a StepLR, snapshotting through snapd at step 6.

- ``full``: uninterrupted; prints ``FINAL <digest of the weights>``.
- ``killed``: at step 6, ``snapshot_state`` hands the state over, ``accelerator.save_state`` writes
  Accelerate's own checkpoint of the same state (OUT_DIR/own), then the process SIGKILLs itself.
- ``resume``: a new process, ``restore_state``; the model and optimizer must equal Accelerate's own
  checkpoint bit for bit (``EQUAL``); then steps 7-9; prints ``RESUMED <step>`` and ``FINAL``.
"""

import hashlib
import os
import signal
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import snapd.client as snapd
from snapd.integrations.accelerate import restore_state, snapshot_state

mode, endpoint, out = sys.argv[1:4]
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Dropout(0.3), torch.nn.ReLU(),
                            torch.nn.Linear(64, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, 2)
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)) for _ in range(9)]
model, opt, sched = accelerator.prepare(model, opt, sched)
client = None if mode == "full" else snapd.connect("acc", endpoint=endpoint, spawn=False, per_rank=["rng"])
start = 0
if mode == "resume":
    start = restore_state(accelerator, client)
    own = load_file(f"{out}/own/model.safetensors")
    for k, v in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(v, own[k]), k
    own_opt = torch.load(f"{out}/own/optimizer.bin", weights_only=True)
    for p, s in own_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt.state_dict()["state"][p][k])), (p, k)
    assert sched.state_dict() == torch.load(f"{out}/own/scheduler.bin", weights_only=True)
    print("EQUAL", flush=True)
    print(f"RESUMED {start}", flush=True)
if mode != "resume":
    torch.manual_seed(7)  # (the dropout's stream; on resume, restored from the snapshot)
for step in range(start + 1, 10):
    x, y = batches[step - 1]
    loss = torch.nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    opt.step()
    sched.step()
    opt.zero_grad()
    if mode == "killed" and step == 6:
        snapshot_state(accelerator, client, step)
        accelerator.save_state(f"{out}/own")
        os.kill(os.getpid(), signal.SIGKILL)
h = hashlib.sha256()
for k, v in sorted(accelerator.unwrap_model(model).state_dict().items()):
    h.update(k.encode() + v.numpy().tobytes())
print(f"FINAL {h.hexdigest()[:16]}", flush=True)
