"""The manifest: what a snapshot holds and where each byte lives.

``manifest.json`` is UTF-8 JSON written last in a snapshot directory. Its
``checksum`` field is the xxh3_64 (hex) of the canonical serialization
(sorted keys, no spaces) of every other field. Everything read from it is
validated before use: a hostile manifest fails with a ``FormatError`` that
names the problem, never with an allocation, a path outside the snapshot or
a traceback from deep inside NumPy.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from snapd.errors import FormatError, VersionError
from snapd.format import dtypes
from snapd.format.chunks import Chunk, check_chunk, check_overlaps
from snapd.format.tree import MAX_DEPTH, key_problem

MAGIC = "snapd-snapshot"
FORMAT_VERSION = 3  # the newest this snapd reads; a snapshot is written in the oldest that holds it
SCOPES = ("shard", "replicated", "rank")  # a rank part's tensors (docs/FORMAT.md section 7)
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3_64"
DATA_FILE_RE = re.compile(r"^data-(\d{5})-of-(\d{5})\.bin\Z", re.ASCII)
MAX_MANIFEST_BYTES = 256 << 20
KINDS = ("numpy", "numpy_scalar", "torch", "cupy")


@dataclass
class TensorRecord:
    key: str
    kind: str
    dtype: str
    shape: list[int]
    nbytes: int
    chunks: list[Chunk] = field(default_factory=list)
    # rank parts only (format 2): what the tensor is to the global snapshot, and whether its bytes are
    # in this part (``stored``: a replicated tensor is written by one rank, a shard replicated over
    # mesh dimensions by the first of them); a shard also says where it lies in the global tensor
    scope: str | None = None
    stored: bool = True
    global_shape: list[int] | None = None
    offsets: list[int] | None = None


@dataclass
class Manifest:
    step: int
    created_unix_s: float
    job: str
    tree: dict
    tensors: list[TensorRecord]
    files: list[dict]  # [{"name": ..., "bytes": ...}]
    metrics: dict[str, Any] = field(default_factory=dict)
    codec: str = "raw"
    emergency: bool = False
    writer: str = ""
    best_metric: tuple[str, str] | None = None  # the job's best rule, so a lost index can be rebuilt
    taken_unix_s: float | None = None  # when the state was handed over: what orders ``latest``
    part: dict | None = None  # a rank's part of a global snapshot: {"rank": r, "world_size": n, "run": id}
    checksum: str | None = None  # the manifest's own (set by parse and by to_bytes): a part's identity
    # the earlier snapshot whose chunks this one could share (section 9), relative to the job directory
    compared_with: str | None = None

    def by_key(self) -> dict[str, int]:
        return {t.key: i for i, t in enumerate(self.tensors)}

    @property
    def raw_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.stored)  # (a replica's bytes are in another part)

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored for t in self.tensors for c in t.chunks)

    @property
    def version(self) -> int:
        """3 if it shares data files with another snapshot (section 9), else 2 for a rank's part and
        1 for a single process's snapshot, so that an older snapd reads what it can."""
        if any("shard" in f for f in self.files):
            return 3
        return 1 if self.part is None else 2

    def to_bytes(self) -> bytes:
        body = {
            "magic": MAGIC, "format_version": self.version,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "step": self.step, "created_unix_s": self.created_unix_s, "job": self.job,
            "metrics": self.metrics, "codec": self.codec, "emergency": self.emergency,
            "writer": self.writer, "raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes,
            "files": self.files, "tree": self.tree,
            "tensors": [_tensor_json(t) for t in self.tensors],
        }
        if self.best_metric is not None:  # absent otherwise: manifests without a rule are as before
            body["best_metric"] = list(self.best_metric)
        if self.taken_unix_s is not None:
            body["taken_unix_s"] = self.taken_unix_s
        if self.part is not None:
            body["part"] = self.part
        if self.compared_with is not None:
            body["compared_with"] = self.compared_with
        body["checksum"] = self.checksum = _checksum(body)
        return json.dumps(body, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"


def _tensor_json(t: TensorRecord) -> dict:
    d = asdict(t)
    for name in ("scope", "global_shape", "offsets"):
        if d[name] is None:
            del d[name]
    if d["stored"]:
        del d["stored"]
    for c in d["chunks"]:
        for name in ("planes", "digest"):
            if c[name] is None:
                del c[name]
    return d


def _checksum(body: dict) -> str:
    canon = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True,
                       separators=(",", ":"), allow_nan=False).encode()
    return xxhash.xxh3_64_hexdigest(canon)


def taken_of(m: Any) -> float:
    """When a snapshot's (or a global snapshot's) state was handed over: its commit where that is not
    recorded. What orders a job's ``latest`` (section 5)."""
    return m.taken_unix_s if m.taken_unix_s is not None else m.created_unix_s


def parse(raw: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest bytes (file sizes are checked by the reader). A global
    snapshot's manifest is refused here: ``snapd.format.global_manifest.parse_any`` reads both.
    The same bytes parsed lately give the same (shared: read-only) Manifest."""
    known = remembered(raw)
    if known is not None:
        return known
    body = parse_body(raw, where)
    if body.get("kind") == "global":
        raise FormatError(f"{where}: the manifest of a global snapshot (its rank parts have their own)")
    return remember(raw, build(body, where))


# Manifests lately parsed, by a hash of their bytes: a load resolves, opens and reads the same
# manifest (a 600-tensor one takes 20 ms to parse and check), and every rank of a node reads its
# step's. Filled as snapshots are read, never at import; bytes that differ in any way miss.
_PARSED: OrderedDict[bytes, Manifest] = OrderedDict()
_PARSED_LOCK = threading.Lock()
_PARSED_MAX, _PARSED_MAX_BYTES = 16, 16 << 20


def remembered(raw: bytes) -> Manifest | None:
    if len(raw) > _PARSED_MAX_BYTES:
        return None
    key = xxhash.xxh3_128_digest(raw)
    with _PARSED_LOCK:
        m = _PARSED.get(key)
        if m is not None:
            _PARSED.move_to_end(key)
        return m


def remember(raw: bytes, m: Manifest) -> Manifest:
    if len(raw) <= _PARSED_MAX_BYTES:
        with _PARSED_LOCK:
            _PARSED[xxhash.xxh3_128_digest(raw)] = m
            while len(_PARSED) > _PARSED_MAX:
                _PARSED.popitem(last=False)
    return m


def build(body: dict, where: str) -> Manifest:
    """The manifest of a checked body (``parse_body``)."""
    try:
        return _build(body)
    except FormatError as e:
        raise type(e)(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def parse_body(raw: bytes, where: str) -> dict:
    """The JSON body of a manifest, its magic, version and checksum checked."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: {len(raw)} bytes, larger than the {MAX_MANIFEST_BYTES} allowed")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("magic") != MAGIC:
        raise FormatError(f"{where}: not a snapd manifest (magic is not {MAGIC!r})")
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{where}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise VersionError(f"{where}: written in format version {version}, newer than the {FORMAT_VERSION} "
                           "this snapd reads: upgrade snapd to load it")
    if body.get("checksum") != _checksum(body):
        raise FormatError(f"{where}: manifest checksum mismatch (the file was modified or torn)")
    return body


def _int(v: Any, what: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise FormatError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def _check_files(files: Any, version: int) -> None:
    if not isinstance(files, list):
        raise FormatError("files must be a list")
    for i, f in enumerate(files):
        m = DATA_FILE_RE.match(str(f.get("name")))
        if not m or int(m.group(1)) != i or int(m.group(2)) != len(files):
            raise FormatError(f"data file {i} has an invalid name {f.get('name')!r} "
                              f"(expected data-{i:05d}-of-{len(files):05d}.bin)")
        _int(f.get("bytes"), f"files[{i}].bytes")
        if "shard" in f or "shared_from" in f:  # a data file shared with another snapshot (format 3)
            if version < 3:
                raise FormatError(f"files[{i}] is shared (shard, shared_from): format 3, not {version}")
            _int(f.get("shard"), f"files[{i}].shard")
            if not isinstance(f.get("shared_from"), str) or len(f["shared_from"]) > 256:
                raise FormatError(f"files[{i}].shared_from must be a string of at most 256 characters")


def _build(body: dict) -> Manifest:
    version = body["format_version"]
    part = _part(body.get("part"), version)
    files = body["files"]
    _check_files(files, version)
    tensors = []
    for ti, t in enumerate(body["tensors"]):
        key = t["key"]
        problem = key_problem(key)
        if problem:
            raise FormatError(f"tensor {ti} has an invalid key path {key!r}: {problem}")
        if t["kind"] not in KINDS:
            raise FormatError(f"{key}: unknown tensor kind {t['kind']!r}")
        size = dtypes.itemsize(t["dtype"])
        shape = [_int(d, f"{key}: shape dimension") for d in t["shape"]]
        nbytes = _int(t["nbytes"], f"{key}: nbytes")
        if math.prod(shape) * size != nbytes:
            raise FormatError(f"{key}: nbytes {nbytes} != {math.prod(shape)} elements x {size} bytes")
        scope, stored, global_shape, offsets = _placement(t, key, shape, part is not None)
        chunks = []
        if not stored and t["chunks"]:
            raise FormatError(f"{key}: stored in another rank's part, yet it lists chunks here")
        for c in t["chunks"]:
            ch = Chunk(file=_int(c["file"], f"{key}: chunk file"),
                       offset=_int(c["offset"], f"{key}: chunk offset"),
                       stored=_int(c["stored"], f"{key}: chunk stored length"),
                       raw=_int(c["raw"], f"{key}: chunk raw length"), codec=c["codec"],
                       checksum=c["checksum"], planes=c.get("planes"), digest=c.get("digest"))
            check_chunk(key, ch, size, files)
            chunks.append(ch)
        if stored and sum(c.raw for c in chunks) != nbytes:
            raise FormatError(f"{key}: chunks decode to {sum(c.raw for c in chunks)} bytes, not {nbytes}")
        tensors.append(TensorRecord(key, t["kind"], t["dtype"], shape, nbytes, chunks, scope, stored,
                                    global_shape, offsets))
    check_overlaps([(t.key, t.chunks) for t in tensors], files)
    _check_tree(body["tree"], len(tensors))
    metrics = body["metrics"]
    if not isinstance(metrics, dict):
        raise FormatError("metrics must be an object")
    best = body.get("best_metric")
    if best is not None and (not isinstance(best, list) or len(best) != 2 or not isinstance(best[0], str)
                             or best[1] not in ("min", "max")):
        raise FormatError(f"best_metric must be [name, 'min'|'max'], got {best!r}")
    compared = body.get("compared_with")
    if compared is not None and (not isinstance(compared, str) or len(compared) > 256):
        raise FormatError("compared_with must be a string of at most 256 characters")
    taken = body.get("taken_unix_s")
    if taken is not None and (isinstance(taken, bool) or not isinstance(taken, (int, float))):
        raise FormatError(f"taken_unix_s must be a number, got {taken!r}")
    return Manifest(step=_int(body["step"], "step"), created_unix_s=float(body["created_unix_s"]),
                    job=str(body["job"]), tree=body["tree"], tensors=tensors, files=files, metrics=metrics,
                    codec=str(body["codec"]), emergency=bool(body.get("emergency", False)),
                    writer=str(body.get("writer", "")), best_metric=tuple(best) if best else None,
                    taken_unix_s=taken, part=part, checksum=body["checksum"], compared_with=compared)


def _part(part: Any, version: int) -> dict | None:
    if version < 2 or version == 3 and part is None:
        if part is not None:
            raise FormatError("a format 1 manifest has no rank part")
        return None
    if not isinstance(part, dict):
        raise FormatError("a format 2 manifest is a rank's part and must say which (part)")
    world = _int(part.get("world_size"), "part.world_size", 1)
    if _int(part.get("rank"), "part.rank") >= world:
        raise FormatError(f"part.rank {part['rank']} is not a rank of world size {world}")
    run = part.get("run", "")
    if not isinstance(run, str) or len(run) > 128:
        raise FormatError(f"part.run must be a string of at most 128 characters, got {str(run)[:40]!r}")
    return {"rank": part["rank"], "world_size": world, "run": run}


def _placement(t: dict, key: str, shape: list[int], is_part: bool
               ) -> tuple[str | None, bool, list[int] | None, list[int] | None]:
    """A part's tensor: its scope, whether its bytes are here, and a shard's place (format 2)."""
    if not is_part:
        return None, True, None, None
    scope, stored = t.get("scope"), t.get("stored", True)
    if scope not in SCOPES or not isinstance(stored, bool) or scope == "rank" and not stored:
        raise FormatError(f"{key}: scope {scope!r} / stored {stored!r} is not a rank part's tensor "
                          f"(scope one of {', '.join(SCOPES)})")
    if scope != "shard":
        return scope, stored, None, None
    whole = [_int(d, f"{key}: global_shape dimension") for d in t.get("global_shape") or []]
    offsets = [_int(d, f"{key}: offset") for d in t.get("offsets") or []]
    if len(whole) != len(shape) or len(offsets) != len(shape) or \
            any(o + n > d for o, n, d in zip(offsets, shape, whole)):
        raise FormatError(f"{key}: a shard of {shape} at {offsets} does not lie inside its global shape "
                          f"{whole}")
    return scope, stored, whole, offsets


def _check_tree(tree: Any, n_tensors: int) -> None:
    seen: set[int] = set()
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict) or depth > MAX_DEPTH:
            raise FormatError(f"tree node {str(node)[:60]!r} is malformed or nested too deep")
        t = node.get("t")
        if t == "tensor":
            i = _int(node.get("i"), "tree tensor index")
            if i >= n_tensors or i in seen:
                raise FormatError(f"tree refers to tensor {i}, which is missing or used twice")
            seen.add(i)
        elif t == "dict":
            if not isinstance(node.get("k"), list) or not isinstance(node.get("v"), list) \
                    or len(node["k"]) != len(node["v"]):
                raise FormatError("tree dict node has mismatched keys and values")
            stack.extend((v, depth + 1) for v in node["v"])
        elif t in ("list", "tuple"):
            if not isinstance(node.get("v"), list):
                raise FormatError(f"tree {t} node has no item list")
            stack.extend((v, depth + 1) for v in node["v"])
        elif t not in ("value", "float", "bytes"):
            raise FormatError(f"unknown tree node type {t!r}")
    if len(seen) != n_tensors:
        raise FormatError(f"tree refers to {len(seen)} of the {n_tensors} tensors")
