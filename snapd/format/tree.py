"""The state tree: flattening a nested state into tensors + a JSON skeleton,
and building it back.

A state is dicts (str or int keys), lists and tuples of tensors (NumPy
arrays, NumPy scalars, torch tensors) and JSON-able leaves (int, float, str,
bool, None, bytes). Each leaf has a key path: its keys joined by ``.``
(``model.encoder.weight``, ``optim.state.0.exp_avg``). No pickle: anything
else is refused with an error naming its key path and type.

Skeleton nodes (``t`` is the node type):
  {"t": "dict", "k": [keys], "v": [nodes]}   {"t": "list"|"tuple", "v": [nodes]}
  {"t": "tensor", "i": index into the manifest's tensor list}
  {"t": "value", "v": json}  {"t": "float", "v": "nan"|"inf"|"-inf"}  {"t": "bytes", "v": base64}
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterator
from typing import Any

from snapd.errors import FormatError, UnsupportedValueError
from snapd.format import dtypes
from snapd.format.leaves import TensorLeaf, array_leaf, torch_leaf

MAX_DEPTH = 64


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a valid tensor key path, or None. Writer and reader share this rule."""
    if not isinstance(key, str) or not key:
        return "empty or not a string"
    if "\x00" in key:
        return "contains NUL"
    if key[0] == "." or key[-1] == "." or ".." in key:  # (no split: this runs for every tensor)
        return "has an empty segment (leading, trailing or doubled '.')"
    return None


def join_key(prefix: str, part: str | int) -> str:
    return f"{prefix}.{part}" if prefix else str(part)


# (one function with its visitors inside: snapshot()'s hot path, where every call per leaf costs the
# trainer; its branches are the kinds of value a state holds)
def flatten(state: Any, keep_device: bool = False, scalars: list[dict] | None = None  # noqa: C901
            ) -> tuple[dict, list[TensorLeaf]]:
    """Split ``state`` into a JSON skeleton and its tensors, in visiting order.

    CUDA tensors are copied to the host here unless ``keep_device`` (the
    daemon's GPU path), which leaves them where they are (``leaf.on_device``).
    ``scalars`` collects the skeleton's value, float and bytes nodes, in
    pre-order (the client sends only these when the rest is unchanged).
    """
    leaves: list[TensorLeaf] = []
    seen: set[str] = set()
    torch = dtypes.torch_module()
    tensor_type, strided = (torch.Tensor, torch.strided) if torch is not None else ((), None)
    # (subclasses: torch_leaf checks)
    plain = (torch.Tensor, torch.nn.Parameter) if torch is not None else ()
    torch_names = dtypes.TORCH_NAMES

    def add(leaf: TensorLeaf, key: str) -> dict:
        n = len(seen)
        seen.add(key)
        if n == len(seen):
            raise UnsupportedValueError(f"{key}: two leaves share this key path")
        if not key or key[0] == "." or key[-1] == "." or ".." in key or "\x00" in key:  # key_problem, inlined
            raise UnsupportedValueError(f"{key or '<root>'}: invalid key path for a tensor: "
                                        f"{key_problem(key)}")
        leaves.append(leaf)
        return {"t": "tensor", "i": n}

    def tensor(obj: Any, key: str) -> dict:
        # A torch tensor, straight from its container: snapshot() pays ~1 us for each call made per
        # tensor, so the common tensor (dense, contiguous, on the CPU or kept on its GPU, a known
        # real dtype) is taken here; any other goes through torch_leaf.
        name = torch_names.get(obj.dtype)
        cpu = obj.is_cpu
        n = len(seen)
        seen.add(key)
        if type(obj) not in plain or obj.is_nested or name is None or name[0] == "c" \
                or obj.layout is not strided or obj.is_neg() \
                or not obj.is_contiguous() \
                or not (cpu or keep_device and obj.is_cuda) or n == len(seen) \
                or not key or key[0] == "." or key[-1] == "." or ".." in key or "\x00" in key:
            if n != len(seen):
                seen.discard(key)  # (add checks it again, and says what is wrong)
            return add(torch_leaf(key, obj, keep_device, strided), key)
        leaves.append(TensorLeaf(key, "torch", name, tuple(obj.shape), None, obj, obj.nbytes, obj.data_ptr(),
                                 not cpu))
        return {"t": "tensor", "i": n}

    def visit(obj: Any, key: str, depth: int) -> dict:
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"{key}: state nests deeper than {MAX_DEPTH} levels")
        if isinstance(obj, tensor_type):
            return tensor(obj, key)
        leaf = array_leaf(key, obj, keep_device)
        if leaf is not None:
            return add(leaf, key)
        if isinstance(obj, dict):
            keys = list(obj.keys())
            for k in keys:
                if isinstance(k, str):
                    if k == "" or "\x00" in k:
                        raise UnsupportedValueError(f"{key or '<root>'}: dict key {k!r} is empty or has NUL")
                elif isinstance(k, bool) or not isinstance(k, int):
                    raise UnsupportedValueError(f"{join_key(key, repr(k))}: dict key of type "
                                                f"{type(k).__name__} (only str and int keys)")
            pre = key + "." if key else ""  # join_key, inlined: this runs for every leaf
            return {"t": "dict", "k": keys,
                    "v": [tensor(v, pre + k if isinstance(k, str) else pre + str(k))
                          if isinstance(v, tensor_type)
                          else visit(v, pre + k if isinstance(k, str) else pre + str(k), depth + 1)
                          for k, v in zip(keys, obj.values())]}
        if isinstance(obj, (list, tuple)):
            t = "tuple" if isinstance(obj, tuple) else "list"
            pre = key + "." if key else ""
            return {"t": t, "v": [tensor(v, pre + str(i)) if isinstance(v, tensor_type)
                                  else visit(v, pre + str(i), depth + 1) for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, str)):
            node = {"t": "value", "v": obj}
        elif isinstance(obj, float):
            node = {"t": "value", "v": obj} if math.isfinite(obj) else {"t": "float", "v": repr(obj)}
        elif isinstance(obj, (bytes, bytearray)):
            node = {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        else:
            node = None
        if node is not None:
            if scalars is not None:
                scalars.append(node)
            return node
        raise UnsupportedValueError(f"{key or '<root>'}: values of type {type(obj).__module__}."
                                    f"{type(obj).__qualname__} cannot be saved (tensors, dict/list/tuple, "
                                    "int, float, str, bool, None and bytes can)")

    return visit(state, "", 0), leaves


def iter_paths(node: dict, key: str = "") -> Iterator[tuple[str, dict]]:
    """Every (key path, node) of a skeleton, containers included, depth first."""
    yield key, node
    t = node.get("t")
    if t == "dict":
        for k, v in zip(node["k"], node["v"]):
            yield from iter_paths(v, join_key(key, k))
    elif t in ("list", "tuple"):
        for i, v in enumerate(node["v"]):
            yield from iter_paths(v, join_key(key, i))


def key_matches(path: str, selector: str) -> bool:
    """``selector`` picks ``path`` itself and everything below it.

    ``"model"`` and ``"model."`` both select ``model.*``; ``""`` selects all.
    """
    sel = selector.rstrip(".")
    return sel == "" or path == sel or path.startswith(sel + ".")


def build(node: dict, make_tensor: Callable[[int, str], Any], key: str = "",
          selected: Callable[[str], bool] | None = None) -> Any:
    """Rebuild a tree from its skeleton; ``make_tensor(index, key)`` supplies tensors.

    With ``selected``, only leaves whose key path it accepts are built;
    containers keep only selected children (lists keep them in order).
    """
    t = node.get("t")
    if t == "dict":
        out = {}
        for k, v in zip(node["k"], node["v"]):
            sub = join_key(key, k)
            if selected is None or _has_selected(v, sub, selected):
                out[k] = build(v, make_tensor, sub, selected)
        return out
    if t in ("list", "tuple"):
        items = [build(v, make_tensor, join_key(key, i), selected)
                 for i, v in enumerate(node["v"])
                 if selected is None or _has_selected(v, join_key(key, i), selected)]
        return tuple(items) if t == "tuple" else items
    if t == "tensor":
        return make_tensor(node["i"], key)
    if t == "value":
        return node["v"]
    if t == "float":
        return float(node["v"])
    if t == "bytes":
        return base64.b64decode(node["v"])
    raise FormatError(f"{key or '<root>'}: unknown tree node type {t!r}")


def _has_selected(node: dict, key: str, selected: Callable[[str], bool]) -> bool:
    return any(selected(p) for p, n in iter_paths(node, key) if n.get("t") not in ("dict", "list", "tuple")
               or not n.get("v"))
