"""The registered path: tensors moved once into shared memory, snapshots as descriptors."""

import copy
import os

import numpy as np
import torch
import zmq

import snapd.client as snapd
from snapd import protocol


def _train(model, opt) -> None:
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_share_model_and_optimizer_snapshots_bit_exact(daemon) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    with snapd.connect("reg", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        ptr = model[0].weight.data_ptr()
        c.share(model, opt)
        # rebound, still a parameter
        assert model[0].weight.data_ptr() != ptr and model[0].weight.requires_grad
        c.guard(opt)
        expected, pendings = [], []
        for step in range(3):
            _train(model, opt)  # training goes on with the shared storage
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            expected.append(copy.deepcopy(sd))
            pendings.append(c.snapshot(sd, step=step))
            # mutate at once: the optimizer's pre-hook waits for the daemon's copy first
        _train(model, opt)
        for step, p in enumerate(pendings):
            assert p.wait(30).step == step
            got = c.restore(step)
            for k, v in expected[step]["model"].items():
                assert torch.equal(got["model"][k], v), (step, k)
            for k, v in expected[step]["optim"]["state"].items():
                assert torch.equal(got["optim"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"])


def test_share_numpy_tree_and_mutation_after_wait_copied(daemon) -> None:
    state = {"w": np.arange(1 << 20, dtype=np.float32), "b": [np.ones(10)], "step": 0}
    with snapd.connect("reg-np", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.share(state)  # arrays are replaced in their containers by region-backed ones
        p = c.snapshot(state, step=1)
        p.wait_copied()
        assert p.copied
        state["w"] += 1  # after wait_copied(), changes do not reach the snapshot
        p.wait(30)
        assert np.array_equal(c.restore(1)["w"], np.arange(1 << 20, dtype=np.float32))
        c.snapshot(state, step=2).wait(30)
        assert c.restore(2)["w"][0] == 1
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"snapd-client-{os.getpid()}-")]


def test_region_of_another_process_refused(daemon) -> None:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.endpoint)
    s.send(protocol.message("hello", 1, job="x", pid=os.getpid(), on_busy="wait"))
    assert s.poll(5000) and protocol.decode_reply(s.recv())["type"] == "welcome"
    for path in ["/etc/passwd", "/dev/shm/snapd-client-1-abcd", "/dev/shm/../etc/shadow"]:
        s.send(protocol.message("register", 2, path=path, bytes=4096))
        assert s.poll(5000)
        r = protocol.decode_reply(s.recv())
        assert r["type"] == "error" and r["code"] == "bad_region", r
    s.close()
