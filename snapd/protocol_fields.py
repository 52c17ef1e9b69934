"""The checks of a request's fields (snapd.protocol's ``REQUESTS``): each a function of the value
and the field's name that raises ProtocolError (code ``bad_field``) naming what is wrong. Shared by
both sides with snapd.protocol, and as light: nothing heavy is imported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from snapd.errors import ProtocolError
from snapd.format import dtypes
from snapd.format.manifest_checks import KINDS
from snapd.format.tree import key_problem

MAX_MESSAGE_BYTES = 64 << 20
MAX_TENSORS = 1_000_000
MAX_INLINE_TENSOR_BYTES = 256  # a tensor this small may travel in the message itself (`inline`)

Validator = Callable[[Any, str], None]


def int_(lo: int = 0, hi: int = 2**63 - 1) -> Validator:
    def check(v: Any, name: str) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ProtocolError(f"{name} must be an integer in [{lo}, {hi}], got {short(v)}", "bad_field")
    return check


def opt(inner: Validator) -> Validator:
    def check(v: Any, name: str) -> None:
        if v is not None:
            inner(v, name)
    return check


def str_(max_len: int = 4096) -> Validator:
    def check(v: Any, name: str) -> None:
        if not isinstance(v, str) or len(v) > max_len:
            raise ProtocolError(f"{name} must be a string of at most {max_len} characters", "bad_field")
    return check


def bool_(v: Any, name: str) -> None:
    if not isinstance(v, bool):
        raise ProtocolError(f"{name} must be true or false, got {short(v)}", "bad_field")


def one_of(*options: str) -> Validator:
    def check(v: Any, name: str) -> None:
        if v not in options:
            raise ProtocolError(f"{name} must be one of {', '.join(options)}, got {short(v)}", "bad_field")
    return check


def seconds(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9:
        raise ProtocolError(f"{name} must be a number of seconds >= 0, got {short(v)}", "bad_field")


def object_(v: Any, name: str) -> None:
    if not isinstance(v, dict):
        raise ProtocolError(f"{name} must be an object", "bad_field")


def best(v: Any, name: str) -> None:
    if v is not None and not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                              and v[1] in ("min", "max")):
        raise ProtocolError(f"{name} must be null or [metric, \"min\"|\"max\"]", "bad_field")


_U64 = int_()


def _fields_u64(t: dict, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is not an integer in [0, 2^63), or None (the fast path: no closures,
    no strings built per tensor; a snapshot of a large model carries 10^4-10^5 descriptors)."""
    for n in names:
        x = t.get(n)
        if type(x) is not int or not 0 <= x < 2**63:
            return n
    return None


def tensors(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_TENSORS} descriptors", "bad_field")
    for i, t in enumerate(v):
        if not isinstance(t, dict):
            raise ProtocolError(f"{name}[{i}] must be an object", "bad_field")
        problem = key_problem(t.get("key"))
        if problem:
            raise ProtocolError(f"{name}[{i}].key {short(t.get('key'))}: {problem}", "bad_field")
        if t.get("kind") not in KINDS:
            raise ProtocolError(f"{name}[{i}].kind must be one of {', '.join(KINDS)}", "bad_field")
        if t.get("dtype") not in dtypes.ITEMSIZE:
            raise ProtocolError(f"{name}[{i}].dtype {short(t.get('dtype'))} is not a known dtype",
                                "bad_field")
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > 64:
            raise ProtocolError(f"{name}[{i}].shape must be a list of at most 64 dimensions", "bad_field")
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**63:
                _U64(d, f"{name}[{i}].shape")
        # registered path: the bytes are at region_offset in a registered region
        bad = _fields_u64(t, ("offset", "nbytes", "region", "region_offset") if "region" in t else
                          ("offset", "nbytes"))
        if bad is not None:
            _U64(t.get(bad), f"{name}[{i}].{bad}")
        if "cuda" in t:  # GPU path: the bytes are at offset in the allocation this IPC handle maps
            _cuda(t["cuda"], f"{name}[{i}].cuda", t["nbytes"])
        if "inline" in t and (t["inline"] is not True or "cuda" in t or "region" in t
                              or t["nbytes"] > MAX_INLINE_TENSOR_BYTES):
            raise ProtocolError(f"{name}[{i}].inline must be true, on a tensor of at most "
                                f"{MAX_INLINE_TENSOR_BYTES} "
                                "bytes that is neither in a region nor on a GPU", "bad_field")
        if math.prod(shape) * dtypes.ITEMSIZE[t["dtype"]] != t["nbytes"]:
            raise ProtocolError(f"{name}[{i}]: nbytes {t['nbytes']} does not match shape {shape} of "
                                f"{t['dtype']}", "bad_field")
        if "global" in t:
            _global(t["global"], f"{name}[{i}].global", shape)


def _global(g: Any, name: str, shape: list[int]) -> None:
    """A DTensor shard's place: {"shape": global shape, "offsets": its corner, "write": whether this
    rank stores it (one rank of those it is replicated over)}; the shard must lie inside."""
    if not isinstance(g, dict) or set(g) != {"shape", "offsets", "write"} or type(g["write"]) is not bool:
        raise ProtocolError(f"{name} must be {{shape, offsets, write}}", "bad_field")
    whole, offsets = g["shape"], g["offsets"]
    if not isinstance(whole, list) or not isinstance(offsets, list) or len(whole) != len(shape) \
            or len(offsets) != len(shape) or any(type(d) is not int or d < 0 for d in whole + offsets) \
            or any(o + n > d for o, n, d in zip(offsets, shape, whole)):
        raise ProtocolError(f"{name}: a shard of {shape} at {short(offsets)} does not lie inside the global "
                            f"shape {short(whole)}", "bad_field")


def _hex(length: int) -> Validator:
    pattern = re.compile(f"[0-9a-f]{{{length}}}")  # one C-level match: a snapshot can carry 10^5 of these

    def check(v: Any, name: str) -> None:
        if not isinstance(v, str) or not pattern.fullmatch(v):
            raise ProtocolError(f"{name} must be {length} lowercase hex digits", "bad_field")
    return check


_HANDLE = _hex(128)
_HANDLE_RE = re.compile("[0-9a-f]{128}")
_DEVICE = str_(64)


def _cuda(v: Any, name: str, nbytes: int) -> None:
    if not isinstance(v, dict):
        raise ProtocolError(f"{name} must be an object", "bad_field")
    dev, handle = v.get("dev"), v.get("handle")
    if not isinstance(dev, str) or len(dev) > 64:
        _DEVICE(dev, f"{name}.dev")
    if not isinstance(handle, str) or not _HANDLE_RE.fullmatch(handle):
        raise ProtocolError(f"{name}.handle must be 128 lowercase hex digits", "bad_field")
    bad = _fields_u64(v, ("offset", "size"))
    if bad is not None or not v["size"]:
        int_(1)(v.get(bad or "size"), f"{name}.{bad or 'size'}")
    if v["offset"] + nbytes > v["size"]:
        raise ProtocolError(f"{name}: {nbytes} bytes at offset {v['offset']} lie outside the "
                            f"{v['size']}-byte allocation", "bad_field")


def devices(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > 64:
        raise ProtocolError(f"{name} must be a list of at most 64 device UUIDs", "bad_field")
    for i, dev in enumerate(v):
        _DEVICE(dev, f"{name}[{i}]")


def events(v: Any, name: str) -> None:
    if not isinstance(v, dict) or len(v) > 64:
        raise ProtocolError(f"{name} must be an object of at most 64 device events", "bad_field")
    for dev, handle in v.items():
        _DEVICE(dev, f"{name} key")
        _HANDLE(handle, f"{name}[{dev}]")


_SCALAR_TYPES = (type(None), bool, int, float, str)


def scalars(v: Any, name: str) -> None:
    """The value, float and bytes nodes of a tree, in pre-order (a layout's new values)."""
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_TENSORS} tree nodes", "bad_field")
    for i, node in enumerate(v):
        _scalar_node(node, f"{name}[{i}]")


def _scalar_node(node: Any, name: str) -> None:
    t = node.get("t") if isinstance(node, dict) else None
    x = node.get("v") if t else None
    if not (t == "value" and type(x) in _SCALAR_TYPES or t == "float" and x in ("nan", "inf", "-inf")
            or t == "bytes" and isinstance(x, str)):
        raise ProtocolError(f"{name} must be a value, float or bytes node of the tree, got {short(node)}",
                            "bad_field")


def changes(v: Any, name: str) -> None:
    """Some of a layout's value nodes: [index in pre-order, node] pairs, indices increasing."""
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_TENSORS} [index, node] pairs",
                            "bad_field")
    last = -1
    for i, pair in enumerate(v):
        if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or pair[0] <= last:
            raise ProtocolError(f"{name}[{i}] must be an [index, node] pair, indices increasing, got "
                                f"{short(pair)}", "bad_field")
        last = pair[0]
        _scalar_node(pair[1], f"{name}[{i}][1]")


def key_paths(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > 1024 or not all(isinstance(k, str) and 0 < len(k) <= 4096
                                                           for k in v):
        raise ProtocolError(f"{name} must be a list of key paths", "bad_field")


def peer_list(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > 1024:
        raise ProtocolError(f"{name} must be a list of at most 1024 peers", "bad_field")
    for i, p in enumerate(v):
        if not isinstance(p, dict) or not isinstance(p.get("endpoint"), str) or len(p["endpoint"]) > 300 \
                or not isinstance(p.get("node", ""), str) or len(p.get("node", "")) > 128:
            raise ProtocolError(f"{name}[{i}] must be {{endpoint: tcp://HOST:PORT, node: NAME}}", "bad_field")


def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
