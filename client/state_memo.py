"""Recognising the state of the last layout without flattening it again.

A training loop hands ``snapshot()`` the same tensors (new objects over the same memory) step after
step. A ``StateMemo``, made when a layout is defined, walks the next state beside that layout's tree,
comparing each tensor's dtype, shape, address and device with the layout's and collecting the
tree's scalars; anything else is a miss, and the state is flattened as before, so a hit describes
exactly the bytes flatten would. The memo holds no tensors (it must not keep a discarded model
alive). Why, in figures: docs/design.md.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict, defaultdict
from typing import Any

from snapd.format import dtypes
from snapd.format.leaves import TensorLeaf

# exact types: a subclass is flattened (it may be anything else too)
_DICT_TYPES = (dict, OrderedDict, defaultdict)
_KEY_TYPES = {str, int}  # exact: True == 1 and IntEnum members == ints, but flatten treats them otherwise
_VALUE_TYPES = (type(None), bool, int, str)

_TENSOR, _TENSOR_DICT, _DICT, _LIST, _TUPLE, _SCALAR = range(6)


class _Miss(Exception):
    pass


class Hit:
    """What a memo hit gives the snapshot: the tensors seen (in leaf order), and the tree's
    scalars that differ from the layout's (by type or value: 1, 1.0 and True differ)."""

    __slots__ = ("sources", "raw", "changed")

    def __init__(self, sources: list[Any], raw: list[Any], changed: list[int]) -> None:
        self.sources, self.raw, self.changed = sources, raw, changed

    def changes(self) -> list[list]:
        """The changed ones, as [index, node] pairs (``changes``: docs/PROTOCOL.md)."""
        return [[i, _value_node(self.raw[i])] for i in self.changed]


class StateMemo:
    """A layout's tree as a walk plan, with what each of its tensors must still answer: torch
    tensors, or device arrays known by ``__cuda_array_interface__`` (CuPy's), not both.

    ``leaves`` become sourceless copies (key, dtype, shape, size, address): what the plain copy,
    inline bytes and staging need besides the tensor itself."""

    def __init__(self, number: int, tree: dict, leaves: list[TensorLeaf], template: Any, torch: Any) -> None:
        self.number = number  # the layout this memo belongs to
        self.leaves = [TensorLeaf(leaf.key, leaf.kind, leaf.dtype, leaf.shape, None, None, leaf.nbytes,
                                  leaf.ptr, leaf.on_device) for leaf in leaves]
        if torch is not None:
            self._checks: list[tuple] = [(leaf.source.dtype, leaf.shape, leaf.ptr, not leaf.on_device,
                                          leaf.dtype[0] == "c") for leaf in leaves]
            # (not subclasses)
            self._tensor, self._strided = (torch.Tensor, torch.nn.Parameter), torch.strided
            self._same = self._same_tensors
        else:  # what each array's interface said (its type too: another kind of array is flattened)
            self._checks = [(type(leaf.source), *_interface(leaf.source), leaf.ptr) for leaf in leaves]
            self._same = self._same_arrays
        self._plan = _compile(tree)
        self._raw: list[Any] = []
        self._types: list[type] = []
        self.template = template  # the layout's snapshot plan, without tensors (client/snapshot_plan.py)

    @classmethod
    def of(cls, number: int, state: Any, tree: dict, leaves: list[TensorLeaf], template: Any
           ) -> StateMemo | None:
        """The memo of layout ``number``, defined by flattening ``state`` into ``tree`` and
        ``leaves``; None unless every leaf is a torch tensor, or every leaf a device array known by
        its ``__cuda_array_interface__``, that flatten took as it is (not a copy it made of a
        non-contiguous tensor, say), so that the walk finds the state it was made from."""
        kinds = {leaf.kind for leaf in leaves}
        if kinds == {"torch"}:
            torch = dtypes.torch_module()  # (never import torch here)
            if torch is None:
                return None
        elif kinds == {"cupy"} and all(leaf.on_device for leaf in leaves):
            torch = None
        else:
            return None
        memo = cls(number, tree, leaves, template, torch)
        found = memo._collect(state)
        if found is None:
            return None
        raw = found[1]
        # a copy: bytearrays change in place
        memo._raw = [bytes(v) if type(v) is bytearray else v for v in raw]
        memo._types = [type(v) for v in raw]
        return memo

    def match(self, state: Any) -> Hit | None:
        """The hit for ``state``, or None when it must be flattened."""
        found = self._collect(state)
        if found is None:
            return None
        sources, raw = found
        if raw == self._raw and list(map(type, raw)) == self._types:  # (the common case, at C speed)
            return Hit(sources, raw, [])
        return Hit(sources, raw, [i for i, (v, old, tp) in enumerate(zip(raw, self._raw, self._types))
                                  if type(v) is not tp or v != old])

    def _collect(self, state: Any) -> tuple[list[Any], list[Any]] | None:
        """The tensors (in leaf order) and scalars of ``state`` if it has the layout's shape and
        every tensor answers as the layout's did; None otherwise."""
        sources: list[Any] = []
        raw: list[Any] = []
        try:
            self._walk(self._plan, state, sources, raw)
        except _Miss:
            return None
        if len(sources) != len(self._checks) or not self._same(sources):
            return None
        return sources, raw

    def _same_tensors(self, sources: list[Any]) -> bool:
        """Whether each tensor (in leaf order) is one flatten would take as it is, with the layout's
        dtype, shape, address and device. Each attribute costs 0.05-0.1 us, times every tensor."""
        tensor_type, strided = self._tensor, self._strided
        try:
            for v, (dtype, shape, ptr, cpu, complex_) in zip(sources, self._checks):
                if type(v) not in tensor_type or v.layout is not strided or v.dtype is not dtype \
                        or v.data_ptr() != ptr or v.shape != shape or v.is_cpu is not cpu \
                        or not v.is_contiguous() or v.is_neg() or not cpu and not v.is_cuda \
                        or complex_ and v.is_conj():
                    return False
        # (a tensor without storage raises on data_ptr; flatten says why it cannot be saved)
        except RuntimeError:
            return False
        return True

    def _same_arrays(self, sources: list[Any]) -> bool:
        """Whether each array (in leaf order) is of the type flatten took, and its interface gives
        the layout's dtype, shape, strides and address (the property builds a dict each call:
        the cost of this check, about 1 us an array)."""
        try:
            for v, (tp, typestr, shape, strides, ptr) in zip(sources, self._checks):
                if type(v) is not tp:
                    return False
                cai = v.__cuda_array_interface__
                if cai["data"][0] != ptr or cai["shape"] != shape or cai["typestr"] != typestr \
                        or cai.get("strides") != strides:
                    return False
        except (AttributeError, KeyError, TypeError, IndexError):  # not an array as the layout's was
            return False
        return True

    def _walk(self, node: tuple, obj: Any, sources: list[Any], raw: list[Any]) -> None:
        """Collect the tensors (in leaf order) and scalars of ``obj``, if it has ``node``'s shape:
        the same container types and keys, a scalar where the layout has one. The tensors are
        checked afterwards, in one loop."""
        kind = node[0]
        if kind is _TENSOR_DICT or kind is _DICT:
            _check_dict(obj, node[1])
            if kind is _TENSOR_DICT:
                sources.extend(obj.values())
                return
            values = obj.values()
        elif kind is _LIST or kind is _TUPLE:
            if type(obj) is not (list if kind is _LIST else tuple) or len(obj) != len(node[2]):
                raise _Miss
            values = obj
        else:  # the root itself is a leaf
            values, node = (obj,), (None, None, (node,))
        for v, child in zip(values, node[2]):
            kind = child[0]
            if kind is _TENSOR:
                sources.append(v)
            elif kind is _SCALAR:  # exactly the types flatten makes value, float and bytes nodes of
                tp = type(v)
                if tp not in _VALUE_TYPES and tp is not float and tp is not bytes and tp is not bytearray:
                    raise _Miss
                raw.append(v)
            elif kind is _TENSOR_DICT:  # (here, not by recursion: an optimizer has one such dict a parameter)
                _check_dict(v, child[1])
                sources.extend(v.values())
            else:
                self._walk(child, v, sources, raw)


def _interface(array: Any) -> tuple[str, tuple, Any]:
    """The typestr, shape (as flatten's leaf has it) and strides a device array's interface gives."""
    cai = array.__cuda_array_interface__
    return cai["typestr"], cai["shape"], cai.get("strides")


def _check_dict(obj: Any, keys: list) -> None:
    """A miss unless ``obj`` is a dict with exactly these keys, in this order, of flatten's key types."""
    if type(obj) not in _DICT_TYPES or list(obj) != keys or not set(map(type, obj)) <= _KEY_TYPES:
        raise _Miss


def _compile(node: dict) -> tuple:
    """A flatten tree (snapd/format/tree.py) as nested tuples; dicts of tensors alone get one loop."""
    t = node["t"]
    if t == "tensor":
        return (_TENSOR, node["i"])
    if t == "dict":
        keys, children = list(node["k"]), node["v"]
        if children and all(c["t"] == "tensor" for c in children):
            return (_TENSOR_DICT, keys, None)  # (its tensors are the next len(keys) leaves)
        return (_DICT, keys, tuple(_compile(c) for c in children))
    if t in ("list", "tuple"):
        return (_LIST if t == "list" else _TUPLE, None, tuple(_compile(c) for c in node["v"]))
    return (_SCALAR,)


def _value_node(v: Any) -> dict:
    """The tree node flatten makes of a scalar (snapd/format/tree.py)."""
    if type(v) is float and not math.isfinite(v):
        return {"t": "float", "v": repr(v)}
    if type(v) is bytes or type(v) is bytearray:
        return {"t": "bytes", "v": base64.b64encode(bytes(v)).decode("ascii")}
    return {"t": "value", "v": v}
