"""The wire protocol between training processes and the daemon (docs/PROTOCOL.md).

Every message is ONE ZeroMQ frame of UTF-8 JSON (the ROUTER side adds the
peer's identity frame). One frame, not a header plus parts: a send is then
atomic even when a signal handler (the preemption dump) sends from the
middle of another call. Bulk bytes never travel here; they go through the
shared-memory buffers the daemon announces in ``welcome``.

This module is shared by both sides and imports nothing heavy (no ZeroMQ).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from snapd import __version__
from snapd.errors import ProtocolError
from snapd.format import dtypes
from snapd.format.manifest import KINDS
from snapd.format.tree import key_problem

# Every message carries it (``v``) and the sender's snapd version (``snapd``): a daemon run as a
# service and a job's environment can differ, and each side refuses the other's messages with
# both versions named. 2: the first released form (0.1.0's version 1 never left the repository).
PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 64 << 20
MAX_TENSORS = 1_000_000
MAX_INLINE_TENSOR_BYTES = 256  # a tensor this small may travel in the message itself (`inline`)

Validator = Callable[[Any, str], None]


def _int(lo: int = 0, hi: int = 2**63 - 1) -> Validator:
    def check(v: Any, name: str) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ProtocolError(f"{name} must be an integer in [{lo}, {hi}], got {_short(v)}", "bad_field")
    return check


def _opt(inner: Validator) -> Validator:
    def check(v: Any, name: str) -> None:
        if v is not None:
            inner(v, name)
    return check


def _str(max_len: int = 4096) -> Validator:
    def check(v: Any, name: str) -> None:
        if not isinstance(v, str) or len(v) > max_len:
            raise ProtocolError(f"{name} must be a string of at most {max_len} characters", "bad_field")
    return check


def _bool(v: Any, name: str) -> None:
    if not isinstance(v, bool):
        raise ProtocolError(f"{name} must be true or false, got {_short(v)}", "bad_field")


def _one_of(*options: str) -> Validator:
    def check(v: Any, name: str) -> None:
        if v not in options:
            raise ProtocolError(f"{name} must be one of {', '.join(options)}, got {_short(v)}", "bad_field")
    return check


def _seconds(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9:
        raise ProtocolError(f"{name} must be a number of seconds >= 0, got {_short(v)}", "bad_field")


def _object(v: Any, name: str) -> None:
    if not isinstance(v, dict):
        raise ProtocolError(f"{name} must be an object", "bad_field")


def _best(v: Any, name: str) -> None:
    if v is not None and not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                              and v[1] in ("min", "max")):
        raise ProtocolError(f"{name} must be null or [metric, \"min\"|\"max\"]", "bad_field")


_U64 = _int()


def _fields_u64(t: dict, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is not an integer in [0, 2^63), or None (the fast path: no closures,
    no strings built per tensor; a snapshot of a large model carries 10^4-10^5 descriptors)."""
    for n in names:
        x = t.get(n)
        if type(x) is not int or not 0 <= x < 2**63:
            return n
    return None


def _tensors(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_TENSORS} descriptors", "bad_field")
    for i, t in enumerate(v):
        if not isinstance(t, dict):
            raise ProtocolError(f"{name}[{i}] must be an object", "bad_field")
        problem = key_problem(t.get("key"))
        if problem:
            raise ProtocolError(f"{name}[{i}].key {_short(t.get('key'))}: {problem}", "bad_field")
        if t.get("kind") not in KINDS:
            raise ProtocolError(f"{name}[{i}].kind must be one of {', '.join(KINDS)}", "bad_field")
        if t.get("dtype") not in dtypes.ITEMSIZE:
            raise ProtocolError(f"{name}[{i}].dtype {_short(t.get('dtype'))} is not a known dtype",
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
        raise ProtocolError(f"{name}: a shard of {shape} at {_short(offsets)} does not lie inside the global "
                            f"shape {_short(whole)}", "bad_field")


def _hex(length: int) -> Validator:
    pattern = re.compile(f"[0-9a-f]{{{length}}}")  # one C-level match: a snapshot can carry 10^5 of these

    def check(v: Any, name: str) -> None:
        if not isinstance(v, str) or not pattern.fullmatch(v):
            raise ProtocolError(f"{name} must be {length} lowercase hex digits", "bad_field")
    return check


_HANDLE = _hex(128)
_HANDLE_RE = re.compile("[0-9a-f]{128}")
_DEVICE = _str(64)


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
        _int(1)(v.get(bad or "size"), f"{name}.{bad or 'size'}")
    if v["offset"] + nbytes > v["size"]:
        raise ProtocolError(f"{name}: {nbytes} bytes at offset {v['offset']} lie outside the "
                            f"{v['size']}-byte allocation", "bad_field")


def _devices(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > 64:
        raise ProtocolError(f"{name} must be a list of at most 64 device UUIDs", "bad_field")
    for i, dev in enumerate(v):
        _DEVICE(dev, f"{name}[{i}]")


def _events(v: Any, name: str) -> None:
    if not isinstance(v, dict) or len(v) > 64:
        raise ProtocolError(f"{name} must be an object of at most 64 device events", "bad_field")
    for dev, handle in v.items():
        _DEVICE(dev, f"{name} key")
        _HANDLE(handle, f"{name}[{dev}]")


_SCALAR_TYPES = (type(None), bool, int, float, str)


def _scalars(v: Any, name: str) -> None:
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
        raise ProtocolError(f"{name} must be a value, float or bytes node of the tree, got {_short(node)}",
                            "bad_field")


def _changes(v: Any, name: str) -> None:
    """Some of a layout's value nodes: [index in pre-order, node] pairs, indices increasing."""
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_TENSORS} [index, node] pairs",
                            "bad_field")
    last = -1
    for i, pair in enumerate(v):
        if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or pair[0] <= last:
            raise ProtocolError(f"{name}[{i}] must be an [index, node] pair, indices increasing, got "
                                f"{_short(pair)}", "bad_field")
        last = pair[0]
        _scalar_node(pair[1], f"{name}[{i}][1]")


def _key_paths(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > 1024 or not all(isinstance(k, str) and 0 < len(k) <= 4096
                                                           for k in v):
        raise ProtocolError(f"{name} must be a list of key paths", "bad_field")


def _peer_list(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > 1024:
        raise ProtocolError(f"{name} must be a list of at most 1024 peers", "bad_field")
    for i, p in enumerate(v):
        if not isinstance(p, dict) or not isinstance(p.get("endpoint"), str) or len(p["endpoint"]) > 300 \
                or not isinstance(p.get("node", ""), str) or len(p.get("node", "")) > 128:
            raise ProtocolError(f"{name}[{i}] must be {{endpoint: tcp://HOST:PORT, node: NAME}}", "bad_field")


# type -> required fields and their validators (optional fields use _opt)
REQUESTS: dict[str, dict[str, Validator]] = {
    "hello": {"job": _str(128), "pid": _int(1), "keep_last": _opt(_int(1)), "keep_every_steps": _opt(_int(1)),
              "best": _best, "on_busy": _one_of("wait", "skip"), "root": _opt(_str()),
              "cuda_devices": _opt(_devices), "notices": _opt(_bool), "rank": _opt(_int()),
              "world_size": _opt(_int(1)), "local_rank": _opt(_int()), "per_rank": _opt(_key_paths),
              "run": _opt(_str(128)), "replicas": _opt(_int(0, 8))},
    "acquire": {"nbytes": _int(), "emergency": _bool},
    # a lease, or nbytes (the daemon leases); tensors and tree, or the number of a layout sent
    # before and new values, all of them or the changed ones (snapd.daemon.layouts); inline: tiny tensors'
    # bytes, base64
    "snapshot": {"lease": _opt(_int()), "nbytes": _opt(_int()), "step": _int(), "metrics": _object,
                 "emergency": _bool, "tree": _opt(_object), "tensors": _opt(_tensors),
                 "layout": _opt(_int(1)), "values": _opt(_scalars), "changes": _opt(_changes),
                 "inline": _opt(_str(MAX_MESSAGE_BYTES)), "ready_events": _opt(_events),
                 "grace_s": _opt(_seconds)},
    "release": {"lease": _int()}, "register": {"path": _str(), "bytes": _int(1)}, "status": {}, "ping": {},
    "bye": {},
    "sync": {},  # answered ("synced") once the job's snapshots in flight, from any client, have ended
    # nodes that share no filesystem (docs/peers.md): the newest step whose parts are all on some node
    # (committed here if need be), and one part brought to this node
    "locate": {"step": _opt(_int())}, "fetch_part": {"step": _int(), "rank": _int()},
    # the job's daemons, as its ranks found them through its process group (client/group_peers.py)
    "peers": {"peers": _peer_list, "complete": _bool},
}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


def decode_request(frame: bytes) -> dict[str, Any]:
    """Parse and validate one request frame, or raise ProtocolError with a code."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes is over the {MAX_MESSAGE_BYTES} limit",
                            "too_large")
    try:
        msg = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not UTF-8 JSON", "malformed") from None
    except RecursionError:
        raise ProtocolError("message is nested too deep", "malformed") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object", "malformed")
    _int()(msg.get("id"), "id")
    if msg.get("v") != PROTOCOL_VERSION:  # (the reply carries the id: a client of any version hears why)
        e = ProtocolError(f"this client speaks {_versions(msg)}; this daemon speaks snapd protocol "
                          f"{PROTOCOL_VERSION} (snapd {__version__}): {_UPGRADE}", "version")
        e.req_id = msg["id"]
        raise e
    kind = msg.get("type")
    fields = REQUESTS.get(kind) if isinstance(kind, str) else None
    try:
        if fields is None:
            raise ProtocolError(f"unknown message type {_short(kind)}", "unknown_type")
        for name, check in fields.items():
            check(msg.get(name), name)
    except ProtocolError as e:
        e.req_id = msg["id"]  # the id is valid by now: the error reply must reach the waiting caller
        e.request = msg  # (a refused snapshot's lease goes back all the same: the server reads it here)
        raise
    return msg


_UPGRADE = ("install the daemon's snapd version in the job's environment, or restart the daemon (snapd "
            "serve, or its service) from the job's version")


def _versions(msg: dict) -> str:
    their = msg.get("snapd")
    return f"snapd protocol {_short(msg.get('v'))}" + (f" (snapd {_short(their)})" if their is not None
                                                       else "")


ENVELOPE = ("v", "snapd", "type", "id")  # the fields every message has


def body(msg: dict[str, Any]) -> dict[str, Any]:
    """A message's own fields, without the envelope."""
    return {k: v for k, v in msg.items() if k not in ENVELOPE}


def message(kind: str, req_id: int | None, **fields: Any) -> bytes:
    """A request or a reply (they have one form)."""
    return encode({"v": PROTOCOL_VERSION, "snapd": __version__, "type": kind, "id": req_id, **fields})


def error_reply(req_id: int | None, code: str, text: str, stage: str = "", **extra: Any) -> bytes:
    """``extra``: fields a code carries besides (``ipc_refused``: ``refused``, ``any_open``)."""
    return message("error", req_id, code=code, message=text, stage=stage, **extra)


def decode_reply(frame: bytes) -> dict[str, Any]:
    """Parse a reply from the daemon (trusted peer, but checked for shape)."""
    try:
        msg = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("reply is not UTF-8 JSON", "malformed") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("reply is not a JSON object with a type", "malformed")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"the daemon speaks {_versions(msg)}; this process has snapd {__version__} "
                            f"(protocol {PROTOCOL_VERSION}): {_UPGRADE}", "version")
    return msg
