"""An Accelerate training loop with snapd: ``python examples/accelerate_loop.py`` (from outside
snapd's clone). Run it twice: the second run resumes from the latest snapshot.

Where Accelerate's loop would call ``accelerator.save_state(dir)``, ``snapshot_state`` hands the
same state to snapd's daemon (spawned if none runs) and training goes on; ``restore_state`` is
``load_state``'s counterpart.
"""

import snapd.client as snapd
import torch
from accelerate import Accelerator

from snapd.integrations.accelerate import restore_state, snapshot_state

accelerator = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, opt = accelerator.prepare(model, opt)
client = snapd.connect("accelerate-example", per_rank=["rng"])
start = restore_state(accelerator, client) or 0  # <- resume (None: a fresh start)
for step in range(start + 1, start + 101):
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
    opt.step()
    opt.zero_grad()
    if step % 20 == 0:
        snapshot_state(accelerator, client, step)  # <- instead of accelerator.save_state(dir)
client.close()
print(f"trained to step {step}")
