"""A layout's memo (client/state_memo.py) recognises the state it was made from without
flattening it, and never anything else: whenever it says hit, flattening that state gives the
same leaves (key, dtype, shape, address, size, device) and the same scalar nodes."""

from __future__ import annotations

import enum
import gc
import math
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch

from snapd.client.state_memo import StateMemo
from snapd.format.tree import flatten


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    return model, opt


def _state(model, opt, step=1, **extra) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, **extra}


def _memo(state) -> StateMemo:
    scalars: list[dict] = []
    tree, leaves = flatten(state, keep_device=True, scalars=scalars)
    memo = StateMemo.of(1, state, tree, leaves, None)
    assert memo is not None
    memo.scalars = scalars  # (the test's own note of the layout's scalar nodes)
    return memo


def _leaf_rows(leaves) -> list[tuple]:
    return [(x.key, x.kind, x.dtype, tuple(x.shape), x.ptr, x.nbytes, x.on_device) for x in leaves]


def _agrees(memo: StateMemo, state) -> bool:
    """Match ``state``; on a hit, check it against flattening the state. True on a hit."""
    hit = memo.match(state)
    if hit is None:
        return False
    scalars: list[dict] = []
    _, leaves = flatten(state, keep_device=True, scalars=scalars)
    assert _leaf_rows(leaves) == _leaf_rows(memo.leaves)
    assert [id(x.source) for x in leaves] == [id(s) for s in hit.sources]
    merged = [dict(n) for n in memo.scalars]  # the layout's values with the changed ones put in
    for i, node in hit.changes():
        merged[i] = node
    assert merged == scalars
    return True


def test_a_fresh_state_dict_of_the_same_tensors_is_recognised() -> None:
    model, opt = _trained()
    memo = _memo(_state(model, opt))
    for _ in range(3):  # state_dict() makes new tensor objects every call, over the same memory
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        opt.step()
        s = _state(model, opt, step=1)
        assert _agrees(memo, s) and memo.match(s).changed == []  # nothing but the tensors' bytes changed
    changed = memo.match(_state(model, opt, step=7))
    assert changed is not None and [n for _, n in changed.changes()] == [{"t": "value", "v": 7}]


@pytest.mark.parametrize("value",
                         [3, 3.5, -0.0, math.nan, math.inf, -math.inf, True, False, None, "s", b"\x00\xff",
                                   bytearray(b"ab"), 10**30])
def test_scalars_come_back_as_flatten_makes_them(value) -> None:
    model, opt = _trained()
    memo = _memo(_state(model, opt, extra=0))
    assert _agrees(memo, _state(model, opt, extra=value))


def test_only_what_changed_is_sent_and_1_is_not_1_0() -> None:
    w = _model()[0].weight

    def state(step, lr, tag) -> dict:
        return {"w": w, "step": step, "lr": lr, "tag": tag}
    memo = _memo(state(1, 1, "a"))
    assert memo.match(state(1, 1, "a")).changed == []
    assert memo.match(state(1, 1.0, "a")).changed == [1]
    assert memo.match(state(True, 1, "a")).changed == [0]
    assert memo.match(state(2, 1, "b")).changes() == [[0, {"t": "value", "v": 2}],
                                                      [2, {"t": "value", "v": "b"}]]


def test_a_bytearray_changed_in_place_is_sent() -> None:
    model, _ = _trained()
    tag = bytearray(b"abc")
    state = {"w": model[0].weight, "tag": tag}
    memo = _memo(state)
    assert memo.match(state).changed == []
    tag[0] = ord("z")
    assert memo.match(state).changes() == [[0, {"t": "bytes", "v": "emJj"}]]


class Color(enum.IntEnum):
    RED = 0


def _misses() -> list[tuple[str, object]]:
    """(what changed, how): each takes the state and gives a changed one."""
    return [
        ("a tensor elsewhere",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": m[0].weight.detach().clone()}}),
        ("same bytes, another shape",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": m[0].weight.view(3, 12)}}),
        ("same bytes, another dtype",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": m[0].weight.view(torch.int32)}}),
        ("same address and shape, transposed",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": m[0].weight.t()}}),
        ("same address, neg bit",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": torch._neg_view(m[0].weight)}}),
        ("a numpy array",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": m[0].weight.detach().numpy()}}),
        ("a sparse tensor",
         lambda s, m: {**s, "model": {**s["model"], "0.weight": m[0].weight.detach().to_sparse()}}),
        ("a key renamed", lambda s, m: {**{k: v for k, v in s.items() if k != "step"}, "steps": 1}),
        ("keys reordered", lambda s, m: dict(reversed(list(s.items())))),
        ("a key more", lambda s, m: {**s, "new": 1}),
        ("a key less", lambda s, m: {k: v for k, v in s.items() if k != "step"}),
        ("an int key now True", lambda s, m: {**s, "optim": {**s["optim"], "state": {
            (True if k == 1 else k): v for k, v in s["optim"]["state"].items()}}}),
        ("an int key now an IntEnum", lambda s, m: {**s, "optim": {**s["optim"], "state": {
            (Color.RED if k == 0 else k): v for k, v in s["optim"]["state"].items()}}}),
        ("a scalar now a NumPy scalar", lambda s, m: {**s, "step": np.float64(1.0)}),
        ("a scalar now an IntEnum", lambda s, m: {**s, "step": Color.RED}),
        ("a scalar now a tensor", lambda s, m: {**s, "step": torch.tensor(1)}),
        ("a tensor now a scalar", lambda s, m: {**s, "model": {**s["model"], "0.bias": 0.0}}),
        ("a tuple now a list", lambda s, m: {**s, "optim": {**s["optim"], "param_groups": [
            {**g, "betas": list(g["betas"])} for g in s["optim"]["param_groups"]]}}),
        ("a list longer", lambda s, m: {**s, "optim": {**s["optim"], "param_groups": [
            *s["optim"]["param_groups"], {"lr": 1}]}}),
        ("a dict now a subclass", lambda s, m: {**s, "model": type("D", (dict,), {})(s["model"])}),
        ("an unsupported value", lambda s, m: {**s, "step": object()}),
    ]


@pytest.mark.parametrize("what,change", _misses(), ids=[m[0] for m in _misses()])
def test_anything_changed_is_a_miss(what, change) -> None:
    model, opt = _trained()
    state = _state(model, opt)
    memo = _memo(state)
    assert _agrees(memo, _state(model, opt))
    assert memo.match(change(state, model)) is None, what


def test_an_ordered_dict_and_a_dict_are_the_same_container() -> None:
    model, opt = _trained()
    memo = _memo(_state(model, opt))
    sd = _state(model, opt)
    assert _agrees(memo, {**sd, "model": dict(sd["model"])}) and _agrees(memo, OrderedDict(sd))


def test_no_memo_for_states_it_could_not_walk_again() -> None:
    model, _ = _trained()
    w = model[0].weight
    for state in ({"w": w.detach().numpy()},  # a NumPy leaf
                  {"w": w.t()},  # flatten copies it (not contiguous): its leaf is not the user's tensor
                  {"step": 1}):  # no tensors
        scalars: list[dict] = []
        tree, leaves = flatten(state, keep_device=True, scalars=scalars)
        assert StateMemo.of(1, state, tree, leaves, None) is None


def test_the_memo_keeps_no_tensor_alive() -> None:
    model, opt = _trained()
    memo = _memo(_state(model, opt))
    gone = weakref.ref(model[0].weight)
    del model, opt
    gc.collect()
    assert gone() is None and memo.leaves[0].source is None


class Cai:
    """A device array as snapd knows CuPy's: by ``__cuda_array_interface__`` only."""

    def __init__(self, ptr: int, shape: tuple = (4, 5), typestr: str = "<f4",
                 strides: tuple | None = None) -> None:
        self.iface = {"typestr": typestr, "shape": shape, "data": (ptr, False), "version": 3,
                      "strides": strides, "stream": 1}

    @property
    def __cuda_array_interface__(self) -> dict:
        return self.iface


class OtherCai(Cai):
    pass


class Gone:
    @property
    def __cuda_array_interface__(self) -> dict:
        raise AttributeError("freed")


def _arrays(**over) -> dict:
    a = {"w": Cai(0x10000), "b": Cai(0x20000, (7,), "<f8"), **over}
    return {"layer": {"w": a["w"], "b": a["b"]}, "step": 3, "lr": 0.1}


def test_a_state_of_device_arrays_is_recognised_by_its_interface() -> None:
    memo = _memo(_arrays())
    assert _agrees(memo, _arrays())  # new objects, the same memory: a hit
    assert _agrees(memo, {**_arrays(), "step": 4})


@pytest.mark.parametrize("change", [
    {"w": Cai(0x10040)},                         # another address
    {"w": Cai(0x10000, (5, 4))},                 # another shape
    {"w": Cai(0x10000, typestr="<i4")},          # another dtype
    {"w": Cai(0x10000, strides=(20, 4))},        # strides given where they were not
    {"w": OtherCai(0x10000)},                    # another kind of array
    {"w": Gone()},                               # an interface that fails
    {"w": np.zeros((4, 5), np.float32)},         # a host array
], ids=["address", "shape", "dtype", "strides", "type", "broken", "numpy"])
def test_a_device_array_that_answers_otherwise_is_a_miss(change) -> None:
    memo = _memo(_arrays())
    assert memo.match(_arrays(**change)) is None


def test_no_memo_for_torch_tensors_beside_device_arrays() -> None:
    state = {"a": Cai(0x10000), "t": torch.zeros(3)}
    tree, leaves = flatten(state, keep_device=True)
    assert StateMemo.of(1, state, tree, leaves, None) is None
