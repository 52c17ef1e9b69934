"""Writes tests/data/golden-v3/: snapshots of format version 3 (data files shared with an earlier
snapshot, docs/FORMAT.md section 9) that every later snapd must keep loading byte-exact. Step 1100
is saved, then step 1200 with one tensor changed, which shares the rest; step 1100 is then
deleted, as retention would. Run once:

    python tests/data/make_golden_v3.py

(git stores a hard link as two files: a clone's step 1200 holds its own copy, as it must.)
Never regenerate an existing version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from snapd.format import index as jobindex
from snapd.format.jobdir import JobDir
from snapd.format.saving import save_state
from snapd.format.writer import Retention

HERE = Path(__file__).parent
OUT = HERE / "golden-v3"


def main() -> None:
    from make_golden import digests, state  # (the same state as golden-v1)

    if OUT.exists():
        shutil.rmtree(OUT)
    expected: dict = {}
    for codec in ("shuffle-lz4", "shuffle-zstd", "lz4", "raw"):
        job = f"golden-{codec}"
        before = state()
        before["model"]["encoder.bias"] = before["model"]["encoder.bias"] * 2
        first = save_state(OUT, job, before, step=1100, metrics={"loss": 0.5}, retention=Retention(),
                           codec=codec, chunk_bytes=256 << 10, shard_bytes=600_000)
        done = save_state(OUT, job, state(), step=1200, metrics={"loss": 0.25}, retention=Retention(),
                          codec=codec, chunk_bytes=256 << 10, shard_bytes=600_000)
        manifest = json.loads((done.path / "manifest.json").read_text())
        assert manifest["format_version"] == 3 and any("shard" in f for f in manifest["files"]), codec
        shutil.rmtree(first.path)
        jobdir = JobDir(OUT, job)
        jobindex.save(jobdir, jobindex.load(jobdir))  # (the index as retention would leave it)
        expected[job] = digests(done.path)
        print(f"wrote {done.path}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
