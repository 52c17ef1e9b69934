import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import get_state_dict
import snapd.client as snapd
from snapd.errors import UnsupportedValueError


def say(text: str) -> None:
    """One write per line: the ranks share the pipe (unbuffered, print's pieces would interleave)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
for m in model:
    fully_shard(m, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 16)).sum().backward()
opt.step()
msd, osd = get_state_dict(model, opt)
with snapd.connect(f"fsdp-{dist.get_rank()}", endpoint=sys.argv[1], spawn=False) as c:
    try:
        c.snapshot({"model": msd, "optim": osd}, step=1).wait(timeout=60)
        say("SAVED")
    except UnsupportedValueError as e:
        say(f"REFUSED {e}")
    try:
        c.share(model)
        say("SHARED")
    except UnsupportedValueError as e:
        say(f"REFUSED-SHARE {e}")
    local = {k: v.to_local() for k, v in msd.items()}
    c.snapshot({"model": local}, step=2).wait(timeout=60)
    back = c.restore(2)["model"]
    assert all(torch.equal(back[k], local[k]) for k in local)
    say("LOCAL-OK")
dist.destroy_process_group()
