"""Writes tests/data/corrupt/: hostile snapshots, each of which a reader must
refuse with a FormatError naming the problem. Run when adding a case:

    python tests/data/make_corrupt.py

Each case is a snapshot directory plus ``expect.txt``: the exception class
and a fragment of its message, tab-separated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable

import numpy as np

from snapd.format.manifest import _checksum
from snapd.format.saving import save_state
from snapd.format.writer import Retention

OUT = Path(__file__).parent / "corrupt"


def _manifest_edit(fn: Callable[[dict], None], fix_checksum: bool = True) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        body = json.loads((d / "manifest.json").read_text())
        fn(body)
        if fix_checksum:  # get past the checksum to test the deeper checks
            body["checksum"] = _checksum(body)
        (d / "manifest.json").write_text(json.dumps(body, indent=1))
    return apply


def _file_edit(name: str, fn: Callable[[bytearray], bytearray]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        p = d / name
        p.write_bytes(fn(bytearray(p.read_bytes())))
    return apply


def _flip(b: bytearray) -> bytearray:
    b[100] ^= 0x40
    return b


def _set(path: list, value: object) -> Callable[[dict], None]:
    def fn(body: dict) -> None:
        obj = body
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return fn


def _overlap(body: dict) -> None:
    a, b = body["tensors"][0]["chunks"][:2]
    b["offset"] = a["offset"] + 8


def _huge(body: dict) -> None:
    t = body["tensors"][0]
    t["shape"], t["nbytes"] = [1 << 40], 4 << 40
    t["chunks"][0]["raw"] = (4 << 40) - sum(c["raw"] for c in t["chunks"][1:])


CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "flipped_byte": (_file_edit("data-00000-of-00002.bin", _flip), "ChecksumError", "checksum mismatch"),
    "truncated_chunk": (_file_edit("data-00001-of-00002.bin", lambda b: b[:-100]), "FormatError",
                        "truncated"),
    "missing_data_file": (lambda d: (d / "data-00001-of-00002.bin").unlink(), "FormatError",
                          "data file is missing"),
    "bad_json": (lambda d: (d / "manifest.json").write_text('{"magic": "snapd-snapshot", '),
                 "FormatError", "not valid JSON"),
    "not_a_manifest": (lambda d: (d / "manifest.json").write_text("[1, 2, 3]"), "FormatError", "magic"),
    "edited_manifest": (_manifest_edit(_set(["metrics", "loss"], 0.0), fix_checksum=False), "FormatError",
                        "manifest checksum mismatch"),
    "newer_version": (_manifest_edit(_set(["format_version"], 3)), "VersionError", "newer"),
    "negative_offset": (_manifest_edit(lambda b: b["tensors"][0]["chunks"][0].update(offset=-5)),
                        "FormatError", "chunk offset must be an integer >= 0"),
    "overlapping_offsets": (_manifest_edit(_overlap), "FormatError", "overlap"),
    "huge_declared_size": (_manifest_edit(_huge), "FormatError", "is over"),
    "offset_past_end": (_manifest_edit(lambda b: b["tensors"][0]["chunks"][0].update(offset=1 << 50)),
                        "FormatError", "runs past the end"),
    "dotdot_key": (_manifest_edit(lambda b: b["tensors"][0].update(key="model..weight")), "FormatError",
                   "invalid key path"),
    "traversal_file_name": (_manifest_edit(lambda b: b["files"][0].update(name="../../etc/passwd")),
                            "FormatError", "invalid name"),
    "bad_data_magic": (_file_edit("data-00000-of-00002.bin", lambda b: bytearray(8) + b[8:]), "FormatError",
                       "magic"),
    "tree_bad_index": (_manifest_edit(lambda b: b["tree"]["v"][0].update(i=99)), "FormatError",
                       "missing or used twice"),
    "unknown_codec": (_manifest_edit(lambda b: b["tensors"][0]["chunks"][0].update(codec="gzip")),
                      "FormatError", "unknown codec"),
    "unknown_dtype": (_manifest_edit(lambda b: b["tensors"][0].update(dtype="float128")), "FormatError",
                      "unknown dtype"),
    "plane_lengths_lie": (_manifest_edit(lambda b: b["tensors"][0]["chunks"][0].update(planes=[1, 1, 1, 1])),
                          "FormatError", "plane lengths add to"),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        i = np.arange(4096, dtype=np.float64)
        state = {"w": (np.sin(i) * 0.02).astype(np.float32), "b": np.arange(1000, dtype=np.int32)}
        base = save_state(tmp, "hostile", state, step=7, retention=Retention(), codec="shuffle-lz4",
                          chunk_bytes=4096, shard_bytes=9000).path
        if OUT.exists():
            shutil.rmtree(OUT)
        for name, (apply, cls, fragment) in CASES.items():
            d = OUT / name
            shutil.copytree(base, d / "snapshot")
            apply(d / "snapshot")
            (d / "expect.txt").write_text(f"{cls}\t{fragment}\n")
    print(f"wrote {len(CASES)} cases under {OUT}")


if __name__ == "__main__":
    main()
