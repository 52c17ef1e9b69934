"""The remote tier: ``python -m bench --only remote`` (or ``python -m bench.remote``).

Against one SeaweedFS server on loopback (tests/s3_server.py), in one run, a state of ``--mib`` MiB
(fp32, a trained-weights-like normal distribution):

1. upload: from the snapshot committed locally to committed in the bucket (the daemon's own count
   of upload seconds), against the floor (boto3's transfer manager uploading the same files, the
   same number of threads) and against DCP saving the same state through fsspec/s3fs;
2. restore from the bucket into a fresh root (``snapd.load(remote=)``), against the floor (the same
   objects downloaded by ranged GETs on the same number of threads, into memory) and ``dcp.load``
   through fsspec/s3fs.
Results: bench/results/remote.{jsonl,md}.

DCP through fsspec needs s3fs, whose aiobotocore pins an older botocore than the newest boto3's:
``pip install "s3fs>=2026.9" "boto3==1.43.*"`` beside snapd[s3] (without it those rows are left out).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.link_shaping import shaped

REPO = Path(__file__).resolve().parent.parent
THREADS = 4  # the daemon's remote_threads default
GET_THREADS = 8  # snapd.remote.reader's


def _server(work: Path):
    sys.path.insert(0, str(REPO))
    from tests.s3_server import S3Server

    server = S3Server.start(work / "s3")
    os.environ.update(server.env())
    return server


def _state(mib: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = mib * (1 << 20) // 4 // 8
    return {f"layer{i}": (rng.standard_normal(n, np.float32) * 0.02) for i in range(8)}


def _daemon(work: Path, url: str, endpoint: str, codec: str) -> subprocess.Popen:
    from snapd.client.connection import probe

    proc = subprocess.Popen([sys.executable, "-m", "snapd", "serve", "--root", str(work / "root"),
                             "--endpoint", endpoint, "--host-buffer-bytes", str(64 << 20), "--remote", url,
                             "--codec", codec, "--incremental", "off"],  # (the same state each time,
                            # written whole)
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "ab"))
    deadline = time.monotonic() + 30
    while probe(endpoint, 1.0) is None:
        assert time.monotonic() < deadline and proc.poll() is None, (work / "daemon.log").read_text()
    return proc


def _upload_floor(store, files: list[Path], prefix: str) -> float:
    from boto3.s3.transfer import TransferConfig

    cfg = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=THREADS)
    t0 = time.perf_counter()
    for f in files:
        store.client.upload_file(str(f), store.bucket, f"{prefix}/{f.name}", Config=cfg)
    return time.perf_counter() - t0


def _download_floor(store, prefix: str) -> float:
    """The same objects by ranged GETs of 16 MiB on GET_THREADS threads, into fresh memory (as a
    restore must land them: the page faults of new memory are part of any download's cost)."""
    keys = store.list(prefix + "/")
    jobs, at = [], 0
    for k, n in keys.items():
        for a in range(0, n, 16 << 20):
            jobs.append((k, a, at, min(16 << 20, n - a)))
            at += jobs[-1][3]
    t0 = time.perf_counter()
    out = memoryview(np.empty(at, np.uint8))
    with ThreadPoolExecutor(GET_THREADS) as pool:
        got = sum(pool.map(lambda j: store.get_range_into(j[0], j[1], out[j[2]:j[2] + j[3]]), jobs))
    assert got == at
    return time.perf_counter() - t0


def _dcp(state: dict, url: str, load: bool) -> float:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    t0 = time.perf_counter()
    if load:
        dcp.load(sd, storage_reader=FsspecReader(url), no_dist=True)
    else:
        dcp.save(sd, storage_writer=FsspecWriter(url, thread_count=THREADS), no_dist=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> None:
    import warnings

    import snapd.client as snapd
    from bench.machine import Recorder, describe
    from snapd.remote.store import Store

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    work = Path(tempfile.mkdtemp(prefix="snapd-remote-", dir=args.dir))
    rec = Recorder(args.out / f"{_name(args)}.jsonl", describe(work))
    server = _server(work)
    url, endpoint = f"{server.url}/bench", f"ipc://{work}/d.sock"
    daemon = _daemon(work, url, endpoint, args.codec)
    state = _state(args.mib)
    has_s3fs = importlib.util.find_spec("s3fs") is not None
    if not has_s3fs:
        print("no s3fs here: DCP through fsspec is not measured (see this module's docstring)", flush=True)
    times: dict[str, list[float]] = {}
    link = contextlib.ExitStack()  # the shaped link, while measuring
    try:
        store = Store.open(url)
        if args.link_gbit:
            link.enter_context(shaped(server.ports["s3.port"], args.link_gbit))
        with snapd.connect("job", endpoint=endpoint, spawn=False, keep_last=2) as c:
            for rep in range(args.reps):
                step = rep + 1
                before = c.status()["remote"]["seconds"]
                c.snapshot(state, step=step).wait(600)
                while c.status()["remote"]["uploaded"] < step:
                    time.sleep(0.05)
                times.setdefault("snapd upload", []).append(c.status()["remote"]["seconds"] - before)
                snap = work / "root" / "job" / f"step-{step:012d}"
                files = sorted(snap.glob("data-*.bin")) + [snap / "manifest.json"]
                times.setdefault("floor upload", []).append(_upload_floor(store, files, f"floor/{step}"))
                if has_s3fs:
                    times.setdefault("DCP fsspec save", []).append(_dcp(state, f"{url}/dcp-{step}", False))
                _download_floor(store, f"bench/job/{snap.name}")  # (warms the server's cache for both)
                down = _download_floor(store, f"bench/job/{snap.name}")
                times.setdefault("floor download", []).append(down)
                shutil.rmtree(work / "fresh", ignore_errors=True)
                t0 = time.perf_counter()
                back = snapd.load(work / "fresh", "job", step, remote=url)
                times.setdefault("snapd restore", []).append(time.perf_counter() - t0)
                assert all(np.array_equal(back[k], v) for k, v in state.items())
                del back
                if has_s3fs:
                    times.setdefault("DCP fsspec load", []).append(_dcp(state, f"{url}/dcp-{step}", True))
                stored = sum(f.stat().st_size for f in files)
        link.close()
        for method, values in times.items():
            rec.add("remote", method, f"{args.mib} MiB fp32, {stored} stored bytes, {_setup(args)}", values,
                    mib=args.mib, codec=args.codec, link_gbit=args.link_gbit)
        (args.out / f"{_name(args)}.md").write_text(_markdown(times, stored, rec.machine, args))
    finally:
        link.close()
        daemon.terminate()
        daemon.wait(120)
        server.stop()
        rec.close()
        shutil.rmtree(work, ignore_errors=True)


def _name(args: argparse.Namespace) -> str:
    """The results' file name: ``remote`` for the defaults (raw, loopback), else what differs."""
    name = "remote" if args.codec == "raw" else f"remote-{args.codec}"
    return name + (f"-{args.link_gbit:g}gbit" if args.link_gbit else "")


def _setup(args: argparse.Namespace) -> str:
    stored = "stored raw" if args.codec == "raw" else f"stored {args.codec} (decoded on restore)"
    link = (f"the server's port capped at {args.link_gbit:g} Gbit/s (bench/link_shaping.py)" if args.link_gbit
            else "loopback, the server on the same cores")
    return f"{stored}, {link}"


def _markdown(times: dict, stored: int, machine: dict, args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    mib = stored / (1 << 20)
    def row(name: str, key: str, floor: str) -> str:
        if key not in med:
            return f"| {name} | - | - | - |"
        return f"| {name} | {med[key]:.2f} | {mib / med[key]:.0f} | {med[key] / med[floor]:.2f}x |"

    flags = (f" --codec {args.codec}" if args.codec != "raw" else "") + (
        f" --link-gbit {args.link_gbit:g}" if args.link_gbit else "")
    return "\n".join([
        "# Remote tier", "",
        f"`python -m bench.remote --mib {args.mib} --reps {args.reps}{flags}` on {machine['cores']} cores, "
        f"commit {machine.get('commit')}: one SeaweedFS server (`weed mini`) here; a {args.mib} MiB "
        f"fp32 state, {_setup(args)}; {stored / (1 << 20):.0f} MiB stored; seconds, median of {args.reps}.",
        "",
        "| | seconds | MiB/s (snapd's stored bytes) | ÷ floor |", "|---|---|---|---|",
        row("snapd: committed locally -> committed remotely", "snapd upload", "floor upload"),
        row("floor: boto3 transfer manager, the same files", "floor upload", "floor upload"),
        row("DCP save through fsspec/s3fs", "DCP fsspec save", "floor upload"),
        row("snapd.load from the bucket, fresh root", "snapd restore", "floor download"),
        row("floor: ranged GETs of the same objects, into fresh memory", "floor download", "floor download"),
        row("dcp.load through fsspec/s3fs", "DCP fsspec load", "floor download"), "",
        "On loopback the floor is the server's own speed, not a network's, and the server shares the "
        "machine's cores with the client (a restore that decodes races it for them); `--link-gbit` puts a "
        "link of that bandwidth between them.", ""])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--codec", default="raw", help="the daemon's codec (raw: the transfer alone; auto: its "
                    "own choice)")
    ap.add_argument("--link-gbit", type=float, default=0.0, help="cap the server's port at this many Gbit/s "
                    "(tc on lo; root)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return ap


if __name__ == "__main__":
    run(parser().parse_args())
