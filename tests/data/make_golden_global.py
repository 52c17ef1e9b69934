"""Writes tests/data/global-v2/: a global snapshot (format version 2) of a job saved on 2 ranks,
that every later snapd must keep loading byte-exact. Run once:

    python tests/data/make_golden_global.py

Each rank's part is written by a thread through the same commit the daemons make. expected.json
records, for each rank's view, each tensor's SHA-256. Never regenerate it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np

from snapd.format.global_reader import open_snapshot
from snapd.format.saving import save_leaves
from snapd.format.tree import flatten
from snapd.format.writer import Retention

OUT = Path(__file__).parent / "global-v2"
WORLD = 2


def full() -> dict[str, np.ndarray]:
    i = np.arange(60_000, dtype=np.float64)
    return {"rows": (np.sin(i * 0.001) * 0.02).astype(np.float32).reshape(300, 200),  # sharded on dim 0
            "cols": np.arange(4096, dtype=np.int32).reshape(64, 64)}  # sharded on dim 1


def part(rank: int) -> None:
    f = full()
    state = {"model": {"rows": f["rows"][rank * 150:(rank + 1) * 150],
                       "cols": f["cols"][:, rank * 32:(rank + 1) * 32].copy(),
                       "bias": np.linspace(-1, 1, 200, dtype=np.float32)},
             "rng": np.full(16, 1000 + rank, np.int16), "step": 1200, "note": b"\x00v2"}
    tree, leaves = flatten(state)
    by_key = {leaf.key: leaf for leaf in leaves}
    by_key["model.rows"].placement = ((300, 200), (rank * 150, 0), True)
    by_key["model.cols"].placement = ((64, 64), (0, rank * 32), True)
    save_leaves(OUT, "golden-global", tree, leaves, step=1200, metrics={"loss": 0.5}, retention=Retention(),
                codec="shuffle-zstd", chunk_bytes=16 << 10, shard_bytes=100_000, threads=2, emergency=False,
                rank=rank, world_size=WORLD, per_rank=("rng",), commit_timeout_s=60, run="golden")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    threads = [threading.Thread(target=part, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected: dict = {}
    path = OUT / "golden-global" / "step-000000001200"
    for rank in range(WORLD):
        with open_snapshot(path, rank) as r:
            for i, t in enumerate(r.manifest.tensors):
                buf = np.empty(t.nbytes, np.uint8)
                r.read_tensors([i], lambda _i, buf=buf: memoryview(buf))
                expected.setdefault(str(rank), {})[t.key] = {"dtype": t.dtype, "shape": t.shape,
                                                             "sha256": hashlib.sha256(buf).hexdigest()}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
