"""Writes tests/data/golden-v1/: a snapshot of format version 1 that every
later snapd must keep loading byte-exact. Run once per format version:

    python tests/data/make_golden.py

It records each tensor's SHA-256 in expected.json; test_golden.py checks
the committed files against it. Never regenerate an existing version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from snapd.format.saving import save_state
from snapd.format.writer import Retention

HERE = Path(__file__).parent
OUT = HERE / "golden-v1"


def state() -> dict:
    i = np.arange(300_000, dtype=np.float64)
    w = (np.sin(i * 0.001) * 0.02).astype(np.float32).reshape(600, 500)
    return {
        "model": {"encoder.weight": w, "encoder.bias": np.linspace(-1, 1, 500, dtype=np.float32),
                  "head.weight": torch.from_numpy(w[:64].copy()).to(torch.bfloat16),
                  "embed": torch.arange(4096, dtype=torch.float16).reshape(64, 64)},
        "optim": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.from_numpy(w[:, :100].copy())}},
                  "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "params": [0]}]},
        "counters": {"ints": np.arange(-50, 50, dtype=np.int64), "mask": np.arange(64) % 3 == 0,
                     "fp8": torch.linspace(-2, 2, 64).to(torch.float8_e4m3fn), "scalar": np.float32(2.5),
                     "empty": np.zeros((0, 7), np.float32), "zero_d": np.array(7, np.int32)},
        "meta": {"note": "golden", "nan": float("nan"), "blob": b"\x00\x01snapd", "none": None},
    }


def digests(path: Path) -> dict:
    """Each tensor of the snapshot at ``path``: its dtype, shape and the SHA-256 of its bytes."""
    from snapd.format.reader import SnapshotReader

    out = {}
    with SnapshotReader(path) as r:
        for i, t in enumerate(r.manifest.tensors):
            buf = np.empty(t.nbytes, np.uint8)
            r.read_tensors([i], lambda _i, buf=buf: memoryview(buf))
            out[t.key] = {"dtype": t.dtype, "shape": t.shape, "sha256": hashlib.sha256(buf).hexdigest()}
    return out


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    expected: dict = {}
    for codec in ("shuffle-lz4", "shuffle-zstd", "lz4", "raw"):
        job = f"golden-{codec}"
        done = save_state(OUT, job, state(), step=1200, metrics={"loss": 0.25}, retention=Retention(),
                          codec=codec, chunk_bytes=256 << 10, shard_bytes=600_000)
        expected[job] = digests(done.path)
        print(f"wrote {done.path}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
