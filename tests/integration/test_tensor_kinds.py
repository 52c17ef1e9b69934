"""The trainer must never crash on a tensor kind snapd does not support yet: FSDP2's DTensors
(a real 2-rank torchrun job, gloo on CPU), nested tensors and other wrapper subclasses are
refused in snapd's words before any byte is read through their pointers."""

from pathlib import Path

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.errors import UnsupportedValueError

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_snapshot.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_dtensor_state_is_refused_and_its_local_shards_round_trip(daemon, torchrun) -> None:
    out = torchrun(SCRIPT, daemon.endpoint)
    assert out.stdout.count("REFUSED model.0.weight: a DTensor") == 2, out.stdout
    assert out.stdout.count("REFUSED-SHARE") == 2 and out.stdout.count("LOCAL-OK") == 2, out.stdout
    assert "SAVED" not in out.stdout and daemon.proc.poll() is None


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
