"""``torchrun ... dcp_writer_job.py ROOT JOB FS_DIR ENDPOINT``: DCP through snapd's writer (gloo, CPU).

An FSDP2 model and AdamW, on each rank: ``dcp.save`` through ``snapd.dcp.SnapshotWriter`` (step 1)
and DCP's own FileSystemWriter of the same state; then ``dcp.async_save`` through the writer as
its stager (step 2), with DCP's own async save of the same state beside it, training changing
the tensors as soon as ``async_save`` returns; then ``use_collectives=False`` (step 3). Each
snapd checkpoint loads back through ``dcp.load`` with ``snapd.dcp.SnapshotReader`` and through
``snapd.load(into=)`` equal, tensor by tensor, to DCP's own save of the same state. Prints
``DCP-WRITER r``.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import snapd.client as snapd
from snapd.dcp import SnapshotReader, SnapshotWriter

root, job, fs_dir, endpoint = sys.argv[1:5]


def model_and_optimizer(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt)
    return model, opt


def train(model, opt) -> None:
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def state_of(model, opt, step: int) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": step}


def flat(state: dict) -> dict:
    out = {f"model.{k}": v.to_local().clone() for k, v in state["model"].items()}
    for fqn, s in state["optim"]["state"].items():
        for name, v in s.items():
            out[f"optim.{fqn}.{name}"] = v.to_local().clone() if hasattr(v, "to_local") else v.clone()
    out["step"] = state["step"]
    return out


def loaded(reader=None, checkpoint_id=None) -> dict:
    model, opt = model_and_optimizer(99)
    state = state_of(model, opt, -1)
    dcp.load(state, storage_reader=reader, checkpoint_id=checkpoint_id)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return flat(state_of(model, opt, state["step"]))


def same(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), (what, ours.keys() ^ theirs.keys())
    for k in ours:
        a, b = ours[k], theirs[k]
        ok = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert ok, f"rank {rank} ({what}): {k} differs"


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
model, opt = model_and_optimizer(0)
client = snapd.connect(job, endpoint=endpoint, spawn=False)

# 1. dcp.save through the writer, DCP's own writer beside it
path1 = f"{root}/{job}/step-1"
dcp.save(state_of(model, opt, 1), checkpoint_id=path1, storage_writer=SnapshotWriter(client=client))
dcp.save(state_of(model, opt, 1), checkpoint_id=f"{fs_dir}/1")
same(loaded(SnapshotReader(path1)), loaded(checkpoint_id=f"{fs_dir}/1"), "dcp.save")

# 2. async_save, the writer staging: the tensors change as soon as it returns
train(model, opt)
dcp.save(state_of(model, opt, 2), checkpoint_id=f"{fs_dir}/2")
path2 = f"{root}/{job}/step-2"
writer = SnapshotWriter(path2, client=client)
saves = dist.new_group(backend="gloo")  # (as DCP advises: async saves off the training's group)
ours = dcp.async_save(state_of(model, opt, 2), checkpoint_id=path2, storage_writer=writer,
                      async_stager=writer, process_group=saves)
train(model, opt)  # at once: the daemon holds the state already
ours.result()
same(loaded(SnapshotReader(path2)), loaded(checkpoint_id=f"{fs_dir}/2"), "async_save")
state = state_of(*model_and_optimizer(7), -1)
snapd.load(root, job, 2, into=state)
same(flat(state), loaded(checkpoint_id=f"{fs_dir}/2"), "snapd.load of async_save")

# 3. without collectives: each rank plans alone, the commit still waits for every rank
path3 = f"{root}/{job}/step-3"
dcp.save(state_of(model, opt, 3), checkpoint_id=path3, storage_writer=SnapshotWriter(client=client),
         use_collectives=False)
dcp.save(state_of(model, opt, 3), checkpoint_id=f"{fs_dir}/3")
same(loaded(SnapshotReader(path3)), loaded(checkpoint_id=f"{fs_dir}/3"), "use_collectives=False")
client.close()
sys.stdout.write(f"DCP-WRITER {rank}\n")
sys.stdout.flush()
dist.barrier()  # every rank is done and has said so
# gloo's teardown of a device mesh's groups aborts now and then under load ("terminate called without
# an active exception", exit -6) after every rank's work is done: torch's, not what this job tests.
# The job ends here instead, its output written.
sys.stdout.flush()
os._exit(0)
