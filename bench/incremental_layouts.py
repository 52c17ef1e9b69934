"""The measurement behind incremental snapshots' on-disk form (docs/FORMAT.md section 9):
``python -m bench.incremental_layouts --dir /var/tmp``.

Writing ``--mib`` MiB durably as one file (snapd's data files, and hard links to them) against as
one fsynced file per 4 MiB chunk (a content-addressed chunk store), and the cost of a hard link.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

CHUNK = 4 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure(work: Path, mib: int) -> dict[str, float]:
    buf = os.urandom(CHUNK)
    n = (mib << 20) // CHUNK
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(work / f"chunk-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
    _fsync_dir(work)
    store = time.perf_counter() - t
    for i in range(n):
        os.unlink(work / f"chunk-{i}")
    t = time.perf_counter()
    fd = os.open(work / "one", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(n):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    one = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(1000):
        os.link(work / "one", work / f"link-{i}")
    _fsync_dir(work)
    link = (time.perf_counter() - t) / 1000
    for p in work.iterdir():
        p.unlink()
    return {"chunk_store_s": store, "one_file_s": one, "link_us": link * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for _ in range(args.reps):
            r = measure(Path(d), args.mib)
            print(f"{args.mib} MiB as {args.mib // 4} fsynced 4 MiB files: {r['chunk_store_s']:.2f} s; "
                  f"as one file: {r['one_file_s']:.2f} s; a hard link: {r['link_us']:.0f} us", flush=True)


if __name__ == "__main__":
    main()
