"""``torchrun ... fsdp2_dcp_load.py SNAPSHOT DCP_DIR``: a model and AdamW sharded by FSDP2 on this world
size load a snapd snapshot a single process took, through ``dcp.load`` and snapd's storage reader, and
the same state through DCP's own save of it; each rank's shards must be equal. Prints LOADED rank."""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from snapd.dcp import SnapshotReader


def sharded() -> tuple:
    torch.manual_seed(1)  # (other weights than the saved ones: the load must replace every one)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def loaded(reader) -> dict:
    model, opt = sharded()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": -1}
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, opt)
    flat = {f"model.{k}": v.to_local().clone() for k, v in msd.items()}
    for pid, s in osd["state"].items():
        for name, v in s.items():
            flat[f"optim.{pid}.{name}"] = v.to_local().clone() if hasattr(v, "to_local") else v.clone()
    flat["lr"] = osd["param_groups"][0]["lr"]
    flat["step"] = state["step"]
    return flat


dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
ours = loaded(SnapshotReader(sys.argv[1]))
theirs = loaded(dcp.FileSystemReader(sys.argv[2]))
assert ours.keys() == theirs.keys(), (ours.keys(), theirs.keys())
for k in ours:
    a, b = ours[k], theirs[k]
    same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert same, f"rank {dist.get_rank()}: {k} differs"
assert ours["step"] == 7 and ours["lr"] == 0.01
sys.stdout.write(f"LOADED {dist.get_rank()} {len(ours)}\n")  # (one write: the ranks share the pipe)
sys.stdout.flush()
dist.barrier()  # every rank is done and has said so
# gloo's teardown of a device mesh's groups aborts now and then under load ("terminate called without
# an active exception", exit -6) after every rank's work is done: torch's, not what this job tests.
# The job ends here instead, its output written.
sys.stdout.flush()
os._exit(0)
