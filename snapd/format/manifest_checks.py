"""The checks a manifest's body passes before any of it is used (docs/FORMAT.md sections 2-3, 7, 9).

Each takes the parsed JSON as it came off the disk or the wire, trusts none of it, and raises a
``FormatError`` naming what is wrong: never an allocation, a path outside the snapshot or a
traceback from deep inside NumPy. ``snapd.format.manifest`` builds its records from what passes.
"""

from __future__ import annotations

import math
import re
from typing import Any

from snapd.errors import FormatError
from snapd.format import dtypes
from snapd.format.chunks import Chunk, check_chunk
from snapd.format.tree import MAX_DEPTH, key_problem

SCOPES = ("shard", "replicated", "rank")  # a rank part's tensors (docs/FORMAT.md section 7)
DATA_FILE_RE = re.compile(r"^data-(\d{5})-of-(\d{5})\.bin\Z", re.ASCII)
KINDS = ("numpy", "numpy_scalar", "torch", "cupy")


def check_int(v: Any, what: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise FormatError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def check_files(files: Any, version: int) -> None:
    if not isinstance(files, list):
        raise FormatError("files must be a list")
    for i, f in enumerate(files):
        m = DATA_FILE_RE.match(str(f.get("name")))
        if not m or int(m.group(1)) != i or int(m.group(2)) != len(files):
            raise FormatError(f"data file {i} has an invalid name {f.get('name')!r} "
                              f"(expected data-{i:05d}-of-{len(files):05d}.bin)")
        check_int(f.get("bytes"), f"files[{i}].bytes")
        if "shard" in f or "shared_from" in f:  # a data file shared with another snapshot (format 3)
            if version < 3:
                raise FormatError(f"files[{i}] is shared (shard, shared_from): format 3, not {version}")
            check_int(f.get("shard"), f"files[{i}].shard")
            if not isinstance(f.get("shared_from"), str) or len(f["shared_from"]) > 256:
                raise FormatError(f"files[{i}].shared_from must be a string of at most 256 characters")


def check_tensor(ti: int, t: dict, files: list[dict], is_part: bool) -> dict[str, Any]:
    """Tensor ``ti`` of a manifest: the fields of its ``TensorRecord``, chunks checked against ``files``."""
    key = t["key"]
    problem = key_problem(key)
    if problem:
        raise FormatError(f"tensor {ti} has an invalid key path {key!r}: {problem}")
    if t["kind"] not in KINDS:
        raise FormatError(f"{key}: unknown tensor kind {t['kind']!r}")
    size = dtypes.itemsize(t["dtype"])
    shape = [check_int(d, f"{key}: shape dimension") for d in t["shape"]]
    nbytes = check_int(t["nbytes"], f"{key}: nbytes")
    if math.prod(shape) * size != nbytes:
        raise FormatError(f"{key}: nbytes {nbytes} != {math.prod(shape)} elements x {size} bytes")
    scope, stored, global_shape, offsets = _placement(t, key, shape, is_part)
    chunks = []
    if not stored and t["chunks"]:
        raise FormatError(f"{key}: stored in another rank's part, yet it lists chunks here")
    for c in t["chunks"]:
        ch = Chunk(file=check_int(c["file"], f"{key}: chunk file"),
                   offset=check_int(c["offset"], f"{key}: chunk offset"),
                   stored=check_int(c["stored"], f"{key}: chunk stored length"),
                   raw=check_int(c["raw"], f"{key}: chunk raw length"), codec=c["codec"],
                   checksum=c["checksum"], planes=c.get("planes"), digest=c.get("digest"))
        check_chunk(key, ch, size, files)
        chunks.append(ch)
    if stored and sum(c.raw for c in chunks) != nbytes:
        raise FormatError(f"{key}: chunks decode to {sum(c.raw for c in chunks)} bytes, not {nbytes}")
    return {"key": key, "kind": t["kind"], "dtype": t["dtype"], "shape": shape, "nbytes": nbytes,
            "chunks": chunks, "scope": scope, "stored": stored, "global_shape": global_shape,
            "offsets": offsets}


def check_extras(body: dict) -> None:
    """The fields beside the tensors: metrics, the best rule, the snapshot compared with, when taken."""
    if not isinstance(body["metrics"], dict):
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


def check_part(part: Any, version: int) -> dict | None:
    """Which rank's part of a global snapshot this is (format 2 and 3), or None for a single process's."""
    if version < 2 or version == 3 and part is None:
        if part is not None:
            raise FormatError("a format 1 manifest has no rank part")
        return None
    if not isinstance(part, dict):
        raise FormatError("a format 2 manifest is a rank's part and must say which (part)")
    world = check_int(part.get("world_size"), "part.world_size", 1)
    if check_int(part.get("rank"), "part.rank") >= world:
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
    whole = [check_int(d, f"{key}: global_shape dimension") for d in t.get("global_shape") or []]
    offsets = [check_int(d, f"{key}: offset") for d in t.get("offsets") or []]
    if len(whole) != len(shape) or len(offsets) != len(shape) or \
            any(o + n > d for o, n, d in zip(offsets, shape, whole)):
        raise FormatError(f"{key}: a shard of {shape} at {offsets} does not lie inside its global shape "
                          f"{whole}")
    return scope, stored, whole, offsets


def check_tree(tree: Any, n_tensors: int) -> None:
    """The structure tree: well formed, no deeper than ``MAX_DEPTH``, each tensor named exactly once."""
    seen: set[int] = set()
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict) or depth > MAX_DEPTH:
            raise FormatError(f"tree node {str(node)[:60]!r} is malformed or nested too deep")
        t = node.get("t")
        if t == "tensor":
            i = check_int(node.get("i"), "tree tensor index")
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
