"""``torchrun ... fsdp2_job.py MODE ROOT JOB DCP_DIR [ENDPOINT,...]``: a real FSDP2 job (gloo, CPU).

- ``save``: trains 3 steps of a model and AdamW sharded by ``fully_shard``, snapshotting each step
  through snapd's daemon (rank r through ``ENDPOINT[r % n]``: two daemons are two nodes), RNG state
  kept per rank; after the last, DCP saves the same state into DCP_DIR. Prints ``SAVED r`` and
  ``RNG r <digest>``.
- ``resume``: a fresh model restores the latest snapshot through the daemon (``client.restore``,
  ``into=``) and must equal, shard by shard, the same model loaded by DCP from DCP_DIR; then it
  snapshots step 4. Prints ``RESUMED r`` and ``RNG-RESTORED r <digest>``.
- ``shared``: the model and AdamW moved into shared memory (``client.share``; the daemon copies
  from there while training goes on), snapshotted each step without waiting; a twin that is not
  shared trains on the same data and must stay equal to it bit for bit (FSDP2's all-gather reads
  what the optimizer updates), and each snapshot restores to the state it was taken of. Prints
  ``SHARED r``.
- ``load``: on any world size, with no daemon: ``snapd.load(ROOT, JOB, 3, into=)`` must equal DCP's
  load of DCP_DIR (the state of step 3), shard by shard. Prints ``LOADED r <tensors>``.
Each line goes out in one write: the ranks share the pipe.
"""

import hashlib
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import snapd.client as snapd

mode, root, job, dcp_dir = sys.argv[1:5]
endpoints = sys.argv[5].split(",") if len(sys.argv) > 5 else []


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def model_and_optimizer(seed: int) -> tuple:
    torch.manual_seed(seed)  # the same weights on every rank, as a real job starts
    # (the last layer's 5 rows shard unevenly: FSDP2 pads them)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt)  # (AdamW's state exists from its first step)
    return model, opt


def train(model, opt) -> float:
    loss = model(torch.randn(4, 16)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def state_of(model, opt, step: int) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "rng": torch.get_rng_state(), "step": step}


def flat(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    out = {f"model.{k}": v.to_local().clone() for k, v in msd.items()}
    for fqn, s in osd["state"].items():
        for name, v in s.items():
            out[f"optim.{fqn}.{name}"] = v.to_local().clone() if hasattr(v, "to_local") else v.clone()
    out["lr"] = osd["param_groups"][0]["lr"]
    return out


def dcp_loaded() -> dict:
    model, opt = model_and_optimizer(99)
    state = state_of(model, opt, -1)
    del state["rng"]  # (DCP keeps one rank's: the snapshot keeps each rank's)
    dcp.load(state, checkpoint_id=dcp_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return flat(model, opt) | {"step": state["step"]}


def same(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), (ours.keys() ^ theirs.keys())
    for k in ours:
        a, b = ours[k], theirs[k]
        ok = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert ok, f"rank {rank} ({what}): {k} differs"


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
if mode == "save":
    model, opt = model_and_optimizer(0)
    torch.manual_seed(100 + rank)  # each rank its own data (and RNG state)
    client = snapd.connect(job, endpoint=endpoints[rank % len(endpoints)], spawn=False, per_rank=["rng"])
    assert (client.rank, client.world_size) == (rank, world)
    for step in (1, 2, 3):
        loss = train(model, opt)
        state = state_of(model, opt, step)
        client.snapshot(state, step=step, metrics={"loss": loss}).wait()
    dcp.save(state, checkpoint_id=dcp_dir)
    client.close()
    say(f"RNG {rank} {digest(state['rng'])}")
    say(f"SAVED {rank}")
elif mode == "resume":
    model, opt = model_and_optimizer(7)
    client = snapd.connect(job, endpoint=endpoints[rank % len(endpoints)], spawn=False, per_rank=["rng"])
    state = state_of(model, opt, -1)
    client.restore("latest", into=state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    same(flat(model, opt) | {"step": state["step"]}, dcp_loaded(), "resume")
    assert state["step"] == 3, state["step"]
    say(f"RNG-RESTORED {rank} {digest(state['rng'])}")
    torch.set_rng_state(state["rng"])
    train(model, opt)
    client.snapshot(state_of(model, opt, 4), step=4).wait()
    client.close()
    say(f"RESUMED {rank}")
elif mode == "shared":
    model, opt = model_and_optimizer(0)
    twin, twin_opt = model_and_optimizer(0)
    client = snapd.connect(job, endpoint=endpoints[rank % len(endpoints)], spawn=False)
    client.share(model, opt)
    client.guard(opt)  # the optimizer's step waits for the daemon's copy, nothing else does
    region = client._regions[0]
    for p in model.parameters():  # each shard lives in the region now, FSDP2's padded one as well
        local = p._local_tensor
        assert local.numel() == 0 or region.offset_of(local.data_ptr(), local.nbytes) is not None
    taken, pendings = [], []
    for step in (1, 2, 3):
        seed = 100 * step + rank
        torch.manual_seed(seed)
        train(model, opt)
        torch.manual_seed(seed)
        train(twin, twin_opt)
        same(flat(model, opt), flat(twin, twin_opt), f"shared, step {step}")
        taken.append(flat(model, opt))
        pendings.append(client.snapshot(state_of(model, opt, step), step=step))
    for step, pending in zip((1, 2, 3), pendings):
        pending.wait()
        fresh, fresh_opt = model_and_optimizer(7)
        state = state_of(fresh, fresh_opt, -1)
        client.restore(step, into=state)
        set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        same(flat(fresh, fresh_opt), taken[step - 1], f"restored step {step}")
    client.close()
    say(f"SHARED {rank}")
elif mode == "load":
    model, opt = model_and_optimizer(7)
    state = state_of(model, opt, -1)
    snapd.load(root, job, 3, into=state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ours = flat(model, opt) | {"step": state["step"]}
    same(ours, dcp_loaded(), "load")
    say(f"LOADED {rank} {len(ours)}")
dist.barrier()  # every rank is done and has said so
# gloo's teardown of a device mesh's groups aborts now and then under load ("terminate called without
# an active exception", exit -6) after every rank's work is done: torch's, not what this job tests.
# The job ends here instead, its output written.
sys.stdout.flush()
os._exit(0)
