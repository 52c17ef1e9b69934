"""The trainer must never crash on a tensor kind snapd does not support: nested tensors, wrapper
subclasses and unreduced (Partial) DTensors are refused in snapd's words before any byte is read
through their pointers; DTensors are saved as their shards (multi-rank: test_distributed.py)."""


import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.errors import UnsupportedValueError

def test_dtensors_save_as_their_shards_and_partial_ones_are_refused(tmp_path) -> None:
    """The issue's first try, as a new user makes it: a DTensor in a 1-rank gloo group saves (the
    local shard is the whole tensor) and loads back; a Partial one is refused, naming its key."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.arange(12.0).reshape(3, 4)
        state = {"w": distribute_tensor(w, mesh, [Shard(0)]), "r": distribute_tensor(w, mesh, [Replicate()])}
        snapd.save(tmp_path, "j", state, step=1)
        back = snapd.load(tmp_path, "j")
        assert torch.equal(back["w"], w) and torch.equal(back["r"], w)
        from torch.distributed.tensor import DTensor

        partial = DTensor.from_local(w, mesh, [Partial()])  # (as a tensor-parallel matmul leaves it)
        with pytest.raises(UnsupportedValueError, match="opt.p: a DTensor with a Partial placement"):
            snapd.save(tmp_path, "j", {"opt": {"p": partial}}, step=2)
        # where a shard lies is remembered per layout (the stall: snapd/format/dtensors.py), but a
        # local tensor that is not the box torch places it in is still refused, however it was made
        spec_like = DTensor.from_local(w, mesh, [Shard(0)], shape=(3, 4), stride=(4, 1))
        snapd.save(tmp_path, "j", {"w": spec_like}, step=3)
        lying = DTensor.from_local(w[:2], mesh, [Shard(0)], shape=(3, 4), stride=(4, 1))
        with pytest.raises(UnsupportedValueError, match=r"w: this DTensor's local shard \(2, 4\)"):
            snapd.save(tmp_path, "j", {"w": lying}, step=4)
    finally:
        dist.destroy_process_group()


def test_nested_and_wrapper_tensors_are_refused_in_snapds_words(tmp_path) -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(UnsupportedValueError, match="nested"):
        snapd.save(tmp_path, "j", {"n": nested}, step=1)
    jagged = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    with pytest.raises(UnsupportedValueError, match="nested"):
        snapd.save(tmp_path, "j", {"n": jagged}, step=1)

    class Wrapper(torch.Tensor):  # a wrapper subclass: its pointer is not its data
        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, (1 << 20,), dtype=torch.float32)

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise RuntimeError("no")
    with pytest.raises(UnsupportedValueError, match="Wrapper"):
        snapd.save(tmp_path, "j", {"w": Wrapper(torch.ones(1))}, step=1)

    class Plain(torch.Tensor):  # a plain subclass over its own storage is saved as a tensor
        pass
    p = torch.arange(10.0).as_subclass(Plain)
    snapd.save(tmp_path, "j", {"p": p, "param": torch.nn.Parameter(torch.ones(3))}, step=2)
    back = snapd.load(tmp_path, "j", step=2)
    assert torch.equal(back["p"], torch.arange(10.0)) and torch.equal(back["param"], torch.ones(3))
    assert not (tmp_path / "j" / "step-000000000001").exists()
    assert np.array_equal(back["param"].numpy(), np.ones(3, np.float32))
