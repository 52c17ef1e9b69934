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
from typing import Any

from snapd import __version__
from snapd import protocol_fields as f
from snapd.errors import ProtocolError
from snapd.protocol_fields import MAX_INLINE_TENSOR_BYTES, MAX_MESSAGE_BYTES, MAX_TENSORS, Validator

__all__ = ["MAX_INLINE_TENSOR_BYTES", "MAX_MESSAGE_BYTES", "MAX_TENSORS", "PROTOCOL_VERSION", "REQUESTS",
           "body", "decode_reply", "decode_request", "encode", "error_reply", "message"]

# Every message carries it (``v``) and the sender's snapd version (``snapd``): a daemon run as a
# service and a job's environment can differ, and each side refuses the other's messages with
# both versions named. 2: the first released form (0.1.0's version 1 never left the repository).
PROTOCOL_VERSION = 2

# type -> required fields and their validators (optional fields use f.opt)
REQUESTS: dict[str, dict[str, Validator]] = {
    "hello": {"job": f.str_(128), "pid": f.int_(1), "keep_last": f.opt(f.int_(1)),
              "keep_every_steps": f.opt(f.int_(1)),
              "best": f.best, "on_busy": f.one_of("wait", "skip"), "root": f.opt(f.str_()),
              "cuda_devices": f.opt(f.devices), "notices": f.opt(f.bool_), "rank": f.opt(f.int_()),
              "world_size": f.opt(f.int_(1)), "local_rank": f.opt(f.int_()), "per_rank": f.opt(f.key_paths),
              "run": f.opt(f.str_(128)), "replicas": f.opt(f.int_(0, 8))},
    "acquire": {"nbytes": f.int_(), "emergency": f.bool_},
    # a lease, or nbytes (the daemon leases); tensors and tree, or the number of a layout sent
    # before and new values, all of them or the changed ones (snapd.daemon.layouts); inline: tiny tensors'
    # bytes, base64
    "snapshot": {"lease": f.opt(f.int_()), "nbytes": f.opt(f.int_()), "step": f.int_(), "metrics": f.object_,
                 "emergency": f.bool_, "tree": f.opt(f.object_), "tensors": f.opt(f.tensors),
                 "layout": f.opt(f.int_(1)), "values": f.opt(f.scalars), "changes": f.opt(f.changes),
                 "inline": f.opt(f.str_(MAX_MESSAGE_BYTES)), "ready_events": f.opt(f.events),
                 "grace_s": f.opt(f.seconds)},
    "release": {"lease": f.int_()}, "register": {"path": f.str_(), "bytes": f.int_(1)}, "status": {},
    "ping": {}, "bye": {},
    # the client takes an emergency snapshot when preempted (client.on_preemption), within deadline_s:
    # a daemon told to stop meanwhile (the same signal, the same moment) waits for it ("noted")
    "preempt": {"deadline_s": f.seconds},
    "sync": {},  # answered ("synced") once the job's snapshots in flight, from any client, have ended
    "remove": {"step": f.int_()},  # a user removes one of the job's snapshots (snapd.daemon.removals)
    # nodes that share no filesystem (docs/peers.md): the newest step whose parts are all on some node
    # (committed here if need be), and one part brought to this node
    "locate": {"step": f.opt(f.int_())}, "fetch_part": {"step": f.int_(), "rank": f.int_()},
    # the job's daemons, as its ranks found them through its process group (client/group_peers.py)
    "peers": {"peers": f.peer_list, "complete": f.bool_},
}


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
    f.int_()(msg.get("id"), "id")
    if msg.get("v") != PROTOCOL_VERSION:  # (the reply carries the id: a client of any version hears why)
        e = ProtocolError(f"this client speaks {_versions(msg)}; this daemon speaks snapd protocol "
                          f"{PROTOCOL_VERSION} (snapd {__version__}): {_UPGRADE}", "version")
        e.req_id = msg["id"]
        raise e
    kind = msg.get("type")
    fields = REQUESTS.get(kind) if isinstance(kind, str) else None
    try:
        if fields is None:
            raise ProtocolError(f"unknown message type {f.short(kind)}", "unknown_type")
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
    return f"snapd protocol {f.short(msg.get('v'))}" + (f" (snapd {f.short(their)})" if their is not None
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
