"""DCP's async_save through snapd: ``torchrun --nproc-per-node 2 examples/dcp_async_save.py [ROOT]``.

An FSDP2 model on CPU (gloo); every 5 steps ``dcp.async_save`` hands the state to snapd's daemon
(spawned if none runs) instead of DCP's own copy and file writes, and training goes on at once.
At the end, the last checkpoint is loaded back with ``dcp.load`` through snapd's reader.
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from snapd.dcp import SnapshotReader, SnapshotWriter

root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/snapd-examples"
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
saves = dist.new_group(backend="gloo")  # async saves off the training's process group, as DCP advises
writer = SnapshotWriter()  # one writer (one connection to the daemon) for every checkpoint
pending = None
for step in range(1, 21):
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0:
        if pending is not None:
            pending.result()  # the previous checkpoint is durable
        msd, osd = get_state_dict(model, opt)
        path = f"{root}/dcp-example/step-{step}"  # <root>/<job>/step-<N>
        writer.reset(path)  # (async_save stages before it tells the writer checkpoint_id)
        pending = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, storage_writer=writer,
                                 async_stager=writer, process_group=saves)
pending.result()
writer.close()
msd, osd = get_state_dict(model, opt)
state = {"model": msd, "optim": osd}
dcp.load(state, storage_reader=SnapshotReader(f"{root}/dcp-example/step-20"))
set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
if dist.get_rank() == 0:
    print(f"step 20 saved through snapd and loaded back with dcp.load: {root}/dcp-example")
dist.barrier()
dist.destroy_process_group()
