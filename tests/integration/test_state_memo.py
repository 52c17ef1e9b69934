"""A training loop's snapshots after the first are replayed from the layout's memo, not flattened
(client/state_memo.py), and each restores exactly the state it was taken of; a changed tensor or
a daemon that forgot the layout sends the state in full again."""

from __future__ import annotations

import pytest
import torch

import snapd.client as snapd
from snapd.client import snapshot_plan


@pytest.fixture
def flattens(monkeypatch) -> list[int]:
    """One entry per snapshot that flattened its state (the real flatten still runs)."""
    out: list[int] = []
    real = snapshot_plan.flattened

    def spy(*args, **kwargs):
        out.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(snapshot_plan, "flattened", spy)
    return out


def _training() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)  # the optimizer's state exists from its first step
    return model, opt


def _step(model, opt) -> None:
    opt.zero_grad()
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()


def _state(model, opt, step: int) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
            "lr": opt.param_groups[0]["lr"]}


def _expected(state: dict) -> dict:
    """A deep copy of the state's values now (the trainer changes them in place afterwards)."""
    if isinstance(state, dict):
        return {k: _expected(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_expected(v) for v in state)
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


def _same(got, want) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, (list, tuple)):
        return type(got) is type(want) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, torch.Tensor):  # bit for bit, dtype and shape included
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape and \
            torch.equal(got.view(torch.uint8) if got.dim() else got,
                        want.view(torch.uint8) if want.dim() else want)
    return type(got) is type(want) and got == want


@pytest.mark.parametrize("share", [False, True], ids=["plain", "registered"])
def test_a_training_loop_is_replayed_and_every_step_restores_exactly(daemon, flattens, sent, share) -> None:
    model, opt = _training()
    with snapd.connect("memo", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        if share:
            c.share(model, opt)
            c.guard(opt)  # optimizer.step() waits for the daemon's copy of the registered tensors
        taken = []
        for step in range(6):
            _step(model, opt)
            if step == 4:
                opt.param_groups[0]["lr"] = 5e-4  # a scalar of the tree changes: values, not a layout
            state = _state(model, opt, step)
            taken.append((c.snapshot(state, step=step), _expected(state)))
        for pending, want in taken:
            pending.wait(30)
            assert _same(c.restore(pending.step), want), pending.step
    assert len(flattens) == 1  # the first snapshot only
    assert "tensors" in sent[0] and all("tensors" not in f and f["layout"]
                                        == sent[0]["layout"] for f in sent[1:])
    # the step changed every time, and the learning rate once: only they travel
    assert [[n["v"] for _, n in f["changes"]] for f in sent[1:]] == [[1], [2], [3], [5e-4, 4, 5e-4],
                                                                     [5e-4, 5, 5e-4]]
    assert all("values" not in f for f in sent)


def test_a_tensor_moved_or_reshaped_is_described_anew(daemon, flattens, sent) -> None:
    model, opt = _training()
    with snapd.connect("moved", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot(_state(model, opt, 0), step=0).wait(30)
        c.snapshot(_state(model, opt, 1), step=1).wait(30)
        with torch.no_grad():
            model[0].weight.data = torch.randn(32, 16)  # other memory: the memo must not name the old
        want2 = _expected(_state(model, opt, 2))
        c.snapshot(_state(model, opt, 2), step=2).wait(30)
        # same bytes as model.3.weight
        reshaped = {**_state(model, opt, 3), "extra": model[3].weight.view(-1)}
        want3 = _expected(reshaped)
        c.snapshot(reshaped, step=3).wait(30)
        flat = {**_state(model, opt, 4), "extra": model[3].weight.view(8, 16)}
        want4 = _expected(flat)
        c.snapshot(flat, step=4).wait(30)
        want5 = _expected(flat)
        c.snapshot(flat, step=5).wait(30)
        for step, want in ((2, want2), (3, want3), (4, want4), (5, want5)):
            assert _same(c.restore(step), want), step
    assert len(flattens) == 4  # steps 1 and 5 replayed
    # the plain path names no addresses: another address alone is the same layout
    assert [("tensors" in f) for f in sent] == [True, False, False, True, True, False]


def test_a_replayed_snapshot_the_daemon_no_longer_knows_is_flattened_and_sent_in_full(
        daemon, flattens, preempt_next_send) -> None:
    """A preemption handler's emergency snapshot of another state lands between the outer
    snapshot's replay and its message: the daemon now holds another layout, so the outer one is
    refused with unknown_layout, and the client flattens its state and sends it in full."""
    model, opt = _training()
    other = {"only": torch.full((3,), 5.0), "flag": True}
    with snapd.connect("reenter-memo", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot(_state(model, opt, 0), step=0).wait(30)
        _step(model, opt)
        want1 = _expected(_state(model, opt, 1))
        preempt_next_send(c, other)
        c.snapshot(_state(model, opt, 1), step=1).wait(30)
        assert len(flattens) == 3  # step 0, the emergency state, step 1 again after unknown_layout
        _step(model, opt)
        want2 = _expected(_state(model, opt, 2))
        c.snapshot(_state(model, opt, 2), step=2).wait(30)
        assert len(flattens) == 3  # replayed from the memo made for the layout step 1 defined
        assert _same(c.restore(99), other)
        assert _same(c.restore(1), want1) and _same(c.restore(2), want2)


def test_new_tensors_every_step_are_flattened_and_the_memo_given_up(daemon, flattens, monkeypatch) -> None:
    """A state of fresh copies each step (``.clone()``, ``.cpu()`` of device tensors) is at new
    addresses every time: after two misses the client stops walking it, and each step restores."""
    from snapd.client.state_memo import StateMemo

    walks: list[int] = []
    real = StateMemo.match
    monkeypatch.setattr(StateMemo, "match", lambda self, state: walks.append(1) or real(self, state))
    model, opt = _training()
    keep = []
    with snapd.connect("fresh", endpoint=daemon.endpoint, spawn=False, keep_last=None) as c:
        for step in range(6):
            _step(model, opt)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            keep.append(state)  # (alive, so no copy can reuse an earlier one's memory)
            c.snapshot({"model": state, "step": step}, step=step).wait(30)
        for step, state in enumerate(keep):
            assert _same(c.restore(step), {"model": state, "step": step})
    assert len(flattens) == 6 and len(walks) == 2
