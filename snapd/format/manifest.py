"""The manifest: what a snapshot holds and where each byte lives.

``manifest.json`` is UTF-8 JSON written last in a snapshot directory. Its
``checksum`` field is the xxh3_64 (hex) of the canonical serialization
(sorted keys, no spaces) of every other field. Everything read from it is
validated before use (``snapd.format.manifest_checks``): a hostile manifest
fails with a ``FormatError`` that names the problem.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from snapd.errors import FormatError, VersionError
from snapd.format.chunks import Chunk, check_overlaps
from snapd.format.manifest_checks import (check_extras, check_files, check_int, check_part, check_tensor,
                                          check_tree)

MAGIC = "snapd-snapshot"
FORMAT_VERSION = 3  # the newest this snapd reads; a snapshot is written in the oldest that holds it
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3_64"
MAX_MANIFEST_BYTES = 256 << 20


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


def _build(body: dict) -> Manifest:
    version = body["format_version"]
    part = check_part(body.get("part"), version)
    files = body["files"]
    check_files(files, version)
    tensors = [TensorRecord(**check_tensor(ti, t, files, part is not None))
               for ti, t in enumerate(body["tensors"])]
    check_overlaps([(t.key, t.chunks) for t in tensors], files)
    check_tree(body["tree"], len(tensors))
    check_extras(body)
    best = body.get("best_metric")
    return Manifest(step=check_int(body["step"], "step"), created_unix_s=float(body["created_unix_s"]),
                    job=str(body["job"]), tree=body["tree"], tensors=tensors, files=files,
                    metrics=body["metrics"], codec=str(body["codec"]),
                    emergency=bool(body.get("emergency", False)), writer=str(body.get("writer", "")),
                    best_metric=tuple(best) if best else None, taken_unix_s=body.get("taken_unix_s"),
                    part=part, checksum=body["checksum"], compared_with=body.get("compared_with"))
