"""``torchrun ... tp_fsdp2_job.py MODE ROOT JOB DCP_DIR [ENDPOINT]``: a real 2-D job (gloo, CPU):
tensor parallelism over the mesh's ``tp`` dimension (the first Linear column-wise, the last
row-wise, torch's own ``parallelize_module``), FSDP2 over ``dp``, as torchtitan lays a model out.
FSDP2 shards a column-wise weight again along the dimension TP split, which torch describes with a
strided placement (``_StridedShard``): the job checks that it really has one.

- ``save`` (4 ranks, mesh 2 x 2): trains 3 steps with AdamW, snapshotting each through the daemon
  at ENDPOINT; DCP saves the last state into DCP_DIR too. Prints ``SAVED r <placements>``.
- ``resume`` (4 ranks, 2 x 2): a fresh model restores the latest snapshot (``client.restore``,
  ``into=``) and must equal, shard by shard, the same model loaded by DCP from DCP_DIR; it trains
  on and snapshots step 4. Prints ``RESUMED r``.
- ``load`` (any world size, FSDP2 only, no TP, no daemon): ``snapd.load(ROOT, JOB, 3, into=)`` must
  equal DCP's load of DCP_DIR into the same 1-D model. Prints ``LOADED r <tensors>``.
Each line goes out in one write: the ranks share the pipe.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import snapd.client as snapd

mode, root, job, dcp_dir = sys.argv[1:5]
endpoint = sys.argv[5] if len(sys.argv) > 5 else None


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


def model_and_optimizer(seed: int, two_d: bool) -> tuple:
    torch.manual_seed(seed)  # the same weights on every rank, as a real job starts
    # (12 rows over 2 x 2 shards evenly; the last layer's 6 outputs shard unevenly under FSDP2 on 4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    if two_d:
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    dp = mesh["dp"] if two_d else mesh
    fully_shard(model[0], mesh=dp)
    fully_shard(model[2], mesh=dp)
    fully_shard(model, mesh=dp)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt, 0)  # (AdamW's state exists from its first step)
    return model, opt


def train(model, opt, seed: int) -> None:
    torch.manual_seed(seed)  # (the ranks of one TP group must see the same batch)
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def state_of(model, opt, step: int) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": step}


def flat(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    out = {f"model.{k}": v.to_local().clone() for k, v in msd.items()}
    for fqn, s in osd["state"].items():
        for name, v in s.items():
            out[f"optim.{fqn}.{name}"] = v.to_local().clone() if hasattr(v, "to_local") else v.clone()
    return out


def dcp_loaded(two_d: bool) -> dict:
    model, opt = model_and_optimizer(99, two_d)
    state = state_of(model, opt, -1)
    dcp.load(state, checkpoint_id=dcp_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return flat(model, opt) | {"step": state["step"]}


def same(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), (ours.keys() ^ theirs.keys())
    for k in ours:
        a, b = ours[k], theirs[k]
        ok = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert ok, f"rank {rank} ({what}): {k} differs"


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if mode in ("save", "resume"):
    assert world == 4, world
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()
else:
    mesh = init_device_mesh("cpu", (world,))
if mode == "save":
    model, opt = model_and_optimizer(0, True)
    placements = {k: "/".join(type(p).__name__ for p in v.placements) for k, v in model.state_dict().items()}
    assert "_StridedShard" in placements["0.weight"], placements  # (torch's strided sharding, for real)
    client = snapd.connect(job, endpoint=endpoint, spawn=False)
    assert (client.rank, client.world_size) == (rank, world)
    for step in (1, 2, 3):
        train(model, opt, 100 * step + dp_rank)
        state = state_of(model, opt, step)
        client.snapshot(state, step=step).wait()
    dcp.save(state, checkpoint_id=dcp_dir)
    client.close()
    say(f"SAVED {rank} {placements['0.weight']} {placements['2.bias']}")
elif mode == "resume":
    model, opt = model_and_optimizer(7, True)
    client = snapd.connect(job, endpoint=endpoint, spawn=False)
    state = state_of(model, opt, -1)
    client.restore("latest", into=state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    same(flat(model, opt) | {"step": state["step"]}, dcp_loaded(True), "resume")
    train(model, opt, 400 + dp_rank)
    client.snapshot(state_of(model, opt, 4), step=4).wait()
    client.close()
    say(f"RESUMED {rank}")
elif mode == "load":
    model, opt = model_and_optimizer(7, False)
    state = state_of(model, opt, -1)
    snapd.load(root, job, 3, into=state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ours = flat(model, opt) | {"step": state["step"]}
    same(ours, dcp_loaded(False), "load")
    say(f"LOADED {rank} {len(ours)}")
dist.barrier()  # every rank is done and has said so
# gloo's teardown of a device mesh's groups aborts now and then under load ("terminate called without
# an active exception", exit -6) after every rank's work is done: torch's, not what this job tests.
# The job ends here instead, its output written.
sys.stdout.flush()
os._exit(0)
