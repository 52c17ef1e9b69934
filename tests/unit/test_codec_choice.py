"""The daemon's codec choice: the codec that gets raw bytes to disk fastest, corrected by real flushes."""

import numpy as np
import pytest

from snapd.daemon.codec_choice import MIN_LEARN_BYTES, choose
from snapd.format.tree import flatten

MB = 1e6


def _weights(n: int = 2 << 20, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    _, leaves = flatten({"w": (rng.standard_normal(n) * 0.02).astype(np.float32)})
    return leaves


def test_incompressible_bytes_are_stored_raw() -> None:
    _, leaves = flatten({"r": np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8)})
    assert choose(leaves, 50 * MB, threads=2).codec == "raw"  # even on a slow disk: nothing shrinks


def test_slow_disk_compresses_fast_disk_writes_raw() -> None:
    leaves = _weights()
    slow = choose(leaves, 1 * MB, threads=2)
    assert slow.codec == "shuffle-zstd", slow.reason  # float weights: the best ratio wins when I/O bounds
    assert slow.rates["shuffle-zstd"][0] > slow.rates["shuffle-lz4"][0] > 1.05
    assert choose(leaves, 1e12, threads=2).codec == "raw"  # no encoder beats a disk that fast


def test_a_flush_slower_than_sampled_switches_the_job_to_raw() -> None:
    """The sample encodes alone; the flush shares the cores. What the flush achieved decides."""
    leaves = _weights()
    first = choose(leaves, 1 * MB, threads=2)
    ratio, sampled = first.rates["shuffle-zstd"]
    disk = sampled / ratio * 0.95  # zstd sampled slightly faster than raw would write
    assert first.revised(disk).codec == "shuffle-zstd"
    raw = 1 << 30
    # the real flush ran at 70% of the sampled speed: slower than writing raw
    after = first.learned("shuffle-zstd", raw, int(raw / ratio), raw / (sampled * 0.7))
    choice = after.revised(disk)
    if choice.codec != "raw":  # a cheaper codec still looks faster on its sample: it gets its try
        lz_ratio, _ = after.rates[choice.codec]
        after = after.learned(choice.codec, raw, int(raw / lz_ratio), raw / (disk * 0.9))
        choice = after.revised(disk)
    assert choice.codec == "raw", choice.reason
    assert after.rates["shuffle-zstd"][1] == pytest.approx(sampled * 0.7)
    on_slow_disk = after.revised(1 * MB)
    assert on_slow_disk.codec == "shuffle-zstd" and "measured in flushes" in on_slow_disk.reason
    # a second flush is averaged with the first, not taken alone
    again = after.learned("shuffle-zstd", raw, int(raw / ratio), raw / (sampled * 0.9))
    assert again.rates["shuffle-zstd"][1] == pytest.approx(sampled * 0.8)


def test_small_or_empty_flushes_do_not_teach() -> None:
    first = choose(_weights(), 1 * MB, threads=2)
    tiny = MIN_LEARN_BYTES - 1
    assert first.learned("shuffle-zstd", tiny, tiny, 10.0) is first  # fsync latency, not codec speed
    assert first.learned("shuffle-zstd", 1 << 30, 0, 1.0) is first
    raw_seen = first.learned("raw", 1 << 30, 1 << 30, 2.0)
    assert raw_seen.rates["raw"] == (1.0, (1 << 30) / 2.0)  # raw's speed becomes finite once measured


def test_an_encode_bound_flush_discounts_the_other_samples_too() -> None:
    """Contention slows every encoder alike: one slow flush corrects all sampled speeds at once."""
    first = choose(_weights(), 1 * MB, threads=2)
    ratio, sampled = first.rates["shuffle-zstd"]
    lz_sampled = first.rates["shuffle-lz4"][1]
    raw = 1 << 30
    waited_on_disk = first.learned("shuffle-zstd", raw, int(raw / ratio), raw / (sampled * 0.5))
    assert waited_on_disk.rates["shuffle-lz4"][1] == lz_sampled  # the disk set the pace: no lesson for lz4
    waited_on_encoder = first.learned("shuffle-zstd", raw, int(raw / ratio), raw / (sampled * 0.5),
                                      encode_bound=True)
    assert waited_on_encoder.rates["shuffle-lz4"][1] == pytest.approx(lz_sampled * 0.5)
    assert waited_on_encoder.rates["raw"] == (1.0, float("inf"))
    # a disk just faster than every halved encoder: compression won on the samples, raw wins now
    disk = 1.1 * max(0.5 * speed for ratio, speed in first.rates.values() if ratio > 1.02)
    assert first.revised(disk).codec != "raw"
    assert waited_on_encoder.revised(disk).codec == "raw"
