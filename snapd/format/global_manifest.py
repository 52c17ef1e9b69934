"""The manifest of a global snapshot: one step of a job that runs on several ranks.

Each rank writes its part (a format 2 manifest and its data files, in ``rank-NNNNN/``); once every
part is there, the writer that delivered the last one checks the parts against each other
(``assemble``) and writes this manifest beside them: which parts make the snapshot (each by its
manifest's checksum), the totals the index lists, and where every piece of every shared tensor lies,
so a reader on any world size plans its reads from this one file (docs/FORMAT.md section 7).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import xxhash

from snapd.errors import FormatError
from snapd.format.manifest import (CHECKSUM_ALGORITHM, MAGIC, MANIFEST_NAME, Manifest, _checksum, build,
                                   parse_body, remember, remembered)
from snapd.format.manifest_checks import check_int

PART_DIR_RE = re.compile(r"^rank-(\d{5})\Z", re.ASCII)


def part_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


@dataclass
class Piece:
    """Where one stored piece of a shared tensor lies: the rank whose part holds it, and its box."""

    rank: int
    offsets: list[int]
    shape: list[int]


@dataclass
class SharedTensor:
    """A tensor the ranks hold together: sharded across them, or replicated (one piece, whole)."""

    key: str
    kind: str
    dtype: str
    shape: list[int]
    scope: str
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class GlobalManifest:
    step: int
    job: str
    world_size: int
    created_unix_s: float
    parts: list[dict]  # [{"rank", "dir", "checksum", "raw_bytes", "stored_bytes"}], in rank order
    tensors: dict[str, SharedTensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    codec: str = "raw"
    emergency: bool = False
    writer: str = ""
    best_metric: tuple[str, str] | None = None
    taken_unix_s: float | None = None

    @property
    def raw_bytes(self) -> int:
        return sum(p["raw_bytes"] for p in self.parts)

    @property
    def stored_bytes(self) -> int:
        return sum(p["stored_bytes"] for p in self.parts)

    def to_bytes(self) -> bytes:
        body = {
            "magic": MAGIC, "format_version": 2, "checksum_algorithm": CHECKSUM_ALGORITHM, "kind": "global",
            "step": self.step, "job": self.job, "world_size": self.world_size,
            "created_unix_s": self.created_unix_s, "metrics": self.metrics, "codec": self.codec,
            "emergency": self.emergency, "writer": self.writer, "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes, "parts": self.parts,
            "tensors": {k: {"kind": t.kind, "dtype": t.dtype, "shape": t.shape, "scope": t.scope,
                            "pieces": [[p.rank, p.offsets, p.shape] for p in t.pieces]}
                        for k, t in self.tensors.items()},
        }
        if self.best_metric is not None:
            body["best_metric"] = list(self.best_metric)
        if self.taken_unix_s is not None:
            body["taken_unix_s"] = self.taken_unix_s
        body["checksum"] = _checksum(body)
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


# Global manifests lately parsed, by a hash of their bytes (as snapd.format.manifest keeps the
# others): a peer's ``have`` reads its 4 newest at every ask, and one of a 64-rank model of 864
# sharded tensors (1.3 MB) took 0.3 s to parse and check. Filled as they are read, never at import.
_GLOBALS: OrderedDict[bytes, GlobalManifest] = OrderedDict()
_GLOBALS_LOCK = threading.Lock()
_GLOBALS_MAX, _GLOBALS_MAX_BYTES = 8, 16 << 20


def global_id(raw: bytes) -> str:
    """What tells a global manifest from another making of its step, briefly (a peer's ``have``):
    the xxh3_64 of its bytes."""
    return xxhash.xxh3_64_hexdigest(raw)


def parse_any(raw: bytes, where: str = MANIFEST_NAME) -> Manifest | GlobalManifest:
    """A snapshot's manifest: a single process's (format 1), a rank part's or a global one (2)."""
    known = remembered(raw)
    if known is not None:
        return known
    key = xxhash.xxh3_128_digest(raw) if len(raw) <= _GLOBALS_MAX_BYTES else None
    with _GLOBALS_LOCK:
        g = _GLOBALS.get(key) if key is not None else None
        if g is not None:
            _GLOBALS.move_to_end(key)
            return g
    body = parse_body(raw, where)
    if body.get("kind") != "global":
        return remember(raw, build(body, where))
    try:
        g = _global(body)
        if key is not None:
            with _GLOBALS_LOCK:
                _GLOBALS[key] = g
                while len(_GLOBALS) > _GLOBALS_MAX:
                    _GLOBALS.popitem(last=False)
        return g
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise FormatError(f"{where}: malformed global manifest ({type(e).__name__}: {e})") from None


def _global(body: dict) -> GlobalManifest:
    world = check_int(body["world_size"], "world_size", 1)
    parts = body["parts"]
    if not isinstance(parts, list) or len(parts) != world:
        raise FormatError(f"a global snapshot of world size {world} must list {world} parts")
    for r, p in enumerate(parts):
        if p.get("rank") != r or p.get("dir") != part_dir(r) or not isinstance(p.get("checksum"), str):
            raise FormatError(f"part {r} is malformed: {str(p)[:80]}")
        check_int(p.get("raw_bytes"), f"part {r} raw_bytes")
        check_int(p.get("stored_bytes"), f"part {r} stored_bytes")
    tensors = {}
    for key, t in body["tensors"].items():
        shape = [check_int(d, f"{key}: shape dimension") for d in t["shape"]]
        pieces = []
        for rank, offsets, piece in t["pieces"]:
            # (plain comparisons, not a call a number: 55k pieces of a 64-rank model are checked at
            # each parse; type() is int leaves bools out, as check_int does)
            ok = type(rank) is int and 0 <= rank < world and type(offsets) is list and type(piece) is list \
                and len(offsets) == len(shape) == len(piece)
            if ok:
                for o, n, d in zip(offsets, piece, shape):
                    if type(o) is not int or type(n) is not int or o < 0 or n < 0 or o + n > d:
                        ok = False
                        break
            if not ok:
                raise FormatError(f"{key}: piece {[rank, offsets, piece]} is not inside {shape} of a rank")
            pieces.append(Piece(rank, offsets, piece))
        if t["scope"] not in ("shard", "replicated"):
            raise FormatError(f"{key}: scope {t['scope']!r} is not a shared tensor's")
        tensors[key] = SharedTensor(key, str(t["kind"]), str(t["dtype"]), shape, t["scope"], pieces)
    best = body.get("best_metric")
    return GlobalManifest(step=check_int(body["step"], "step"), job=str(body["job"]), world_size=world,
                          created_unix_s=float(body["created_unix_s"]), parts=parts, tensors=tensors,
                          metrics=dict(body["metrics"]), codec=str(body["codec"]),
                          emergency=bool(body.get("emergency")), writer=str(body.get("writer", "")),
                          best_metric=tuple(best) if best else None, taken_unix_s=body.get("taken_unix_s"))


def assemble(parts: list[Manifest], writer: str, created_unix_s: float) -> GlobalManifest:
    """The global manifest of a step's parts (``parts[r]`` is rank r's), or the error naming what
    disagrees: no global snapshot is made of inconsistent parts."""
    first = parts[0]
    world = len(parts)
    for r, m in enumerate(parts):
        if m.part is None or m.part["rank"] != r or m.part["world_size"] != world or m.step != first.step \
                or m.part["run"] != first.part["run"]:
            raise FormatError(f"rank {r}'s part says {m.part} at step {m.step}, not rank {r} of {world} at "
                              f"step {first.step}")
    tensors: dict[str, SharedTensor] = {}
    seen: dict[str, set[int]] = {}
    for r, m in enumerate(parts):
        for t in m.tensors:
            if t.scope == "rank":
                continue
            whole = t.global_shape if t.scope == "shard" else t.shape
            have = tensors.get(t.key)
            if have is None:
                have = tensors[t.key] = SharedTensor(t.key, t.kind, t.dtype, list(whole), t.scope)
            elif (have.scope, have.dtype, have.shape) != (t.scope, t.dtype, list(whole)):
                raise FormatError(f"{t.key}: rank {r} holds a {t.scope} {t.dtype} tensor of shape "
                                  f"{list(whole)}, an earlier rank a {have.scope} {have.dtype} one of shape "
                                  f"{have.shape}: the ranks disagree")
            seen.setdefault(t.key, set()).add(r)
            if t.stored:
                have.pieces.append(Piece(r, list(t.offsets or [0] * len(t.shape)), list(t.shape)))
    for key, t in tensors.items():
        absent = sorted(set(range(world)) - seen[key])
        if absent:
            raise FormatError(f"{key}: rank {absent[0]} has no such tensor, rank {min(seen[key])} has "
                              f"({len(absent)} of {world} ranks lack it)")
        covered = sum(math.prod(p.shape) for p in t.pieces)
        if t.scope == "replicated" and len(t.pieces) != 1:
            raise FormatError(f"{key}: a replicated tensor stored by {len(t.pieces)} ranks, not one")
        if covered != math.prod(t.shape):
            raise FormatError(f"{key}: the ranks' stored shards cover {covered} of its {math.prod(t.shape)} "
                              "elements")
    return GlobalManifest(
        step=first.step, job=first.job, world_size=world, created_unix_s=created_unix_s,
        parts=[{"rank": r, "dir": part_dir(r), "checksum": m.checksum, "raw_bytes": m.raw_bytes,
                "stored_bytes": m.stored_bytes} for r, m in enumerate(parts)],
        tensors=tensors, metrics=first.metrics, codec=first.codec,
        emergency=any(m.emergency for m in parts), writer=writer, best_metric=first.best_metric,
        taken_unix_s=max((m.taken_unix_s or m.created_unix_s) for m in parts))

