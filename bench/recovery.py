"""A lost node's resume: ``python -m bench --only recovery`` (or ``python -m bench.recovery``).

Three daemons on loopback TCP, each with its own root (three nodes that share no filesystem), peer
replicas on (one copy of each rank part on the next node) and the remote tier (one SeaweedFS server,
tests/s3_server.py). A 3-rank job (no process group: ranks given) snapshots ``--mib`` MiB per rank,
each rank's own tensors (``per_rank``), stored raw. Then rank 2's state is restored, in one run:

1. from local disk: through node 2's daemon, before the node is lost (its page cache warm), and
   again with the step's pages dropped (posix_fadvise DONTNEED: a node rebooted, a cold disk);
2. from peers: node 2 killed and its disk removed, a replacement daemon with an empty root; its
   client's ``restore()`` finds the step and brings rank 2's part from the replica in node 0's memory;
   then again with a rank that waits until the daemon has brought the part (it starts at the hello:
   snapd.daemon.prefetch) before it calls ``restore()``, as a trainer whose startup outlasts the
   transfer: the wait and the ``restore()`` call each timed;
3. from the remote tier: ``snapd.load(fresh root, remote=)`` (ranged GETs, 8 in flight);
and the two floors under 2 and 3: the same bytes pulled over the peer links a restore uses (CurveZMQ,
4 links at once) into memory, and by ranged GETs from the bucket into memory. Each is timed after
``os.sync()`` (the three "nodes" share one disk, whose writeback of the others' snapshots would
otherwise land on whichever restore runs next), and ``SETTLE_S`` later; each restore from
``connect()``. Then the same for a job on one process (bench/recovery_single.py).
Results: bench/results/recovery.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
JOB, WORLD, LOST = "job", 3, 2
SETTLE_S = 1.0  # before each timing: on 2 cores, what the last step set going (uploads, replicas,
# a daemon's start) slowed a restore started at once 2-5x (a warm local one: 0.3 s against 0.05-0.1 s)
PEERS = "peers (replacement node)"
PREFETCH = "peers: connect() to the part here (prefetch)"
PEERS_AFTER = "peers: restore() once the part is here"


def _state(mib: int, rank: int) -> dict:
    rng = np.random.default_rng(rank)
    n = mib * (1 << 20) // 4 // 4
    return {"own": {f"t{i}": rng.standard_normal(n, np.float32) * 0.02 for i in range(4)}}


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


class Cluster:
    def __init__(self, work: Path, url: str | None, mib: int) -> None:
        from snapd.peers.keys import create

        self.work, self.url, self.mib = work, url, mib
        self.sockets = Path(tempfile.mkdtemp(prefix="snapd-"))  # (short: an ipc path has 107 bytes at most)
        create(work / "keys")
        self.peers = sorted(f"tcp://127.0.0.1:{p}" for p in _ports(WORLD))
        self.procs: list[subprocess.Popen | None] = [None] * WORLD
        self.endpoints = [""] * WORLD
        self.remote = [True] * WORLD  # (each node's daemon uploads to the bucket)
        for i in range(WORLD):
            self.start(i)

    def start(self, i: int, remote: bool = True) -> str:
        from snapd.client.connection import probe

        endpoint = f"ipc://{self.sockets}/node{i}-{time.monotonic_ns()}.sock"
        args = [sys.executable, "-m", "snapd", "serve", "--root", str(self.work / f"node{i}"), "--endpoint",
                endpoint, "--host-buffer-bytes", str((self.mib + 16) << 20), "--codec", "raw",
                "--incremental", "off", "--peer-endpoint", self.peers[i], "--peers", ",".join(self.peers),
                "--peer-keys", str(self.work / "keys"), "--node-name", f"node{i}"]
        remote = remote and self.url is not None  # (None: --no-remote, no bucket at all)
        args += ["--remote", self.url] if remote else []
        self.remote[i] = remote
        self.procs[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                         stderr=open(self.work / f"node{i}.log", "ab"))
        deadline = time.monotonic() + 60
        while probe(endpoint, 1.0) is None:
            assert time.monotonic() < deadline and self.procs[i].poll() is None, \
                (self.work / f"node{i}.log").read_text()[-3000:]
        self.endpoints[i] = endpoint
        return endpoint

    def lose(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        p.kill()
        p.wait()
        shutil.rmtree(self.work / f"node{i}", ignore_errors=True)

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(120)
        shutil.rmtree(self.sockets, ignore_errors=True)


def _snapshot(cluster: Cluster, step: int) -> None:
    """Each rank from its own process (the job's ranks), waiting for the global commit."""
    code = ("import sys, snapd.client as s; from bench.recovery import _state\n"
            "ep, r, step, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\n"
            "with s.connect('job', endpoint=ep, spawn=False, rank=r, world_size=3, run_id='bench',"
            " per_rank=['own'], keep_last=2) as c:\n"
            "    c.snapshot(_state(mib, r), step=step).wait(600)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, cluster.endpoints[r], str(r), str(step),
                               str(cluster.mib)], cwd=REPO) for r in range(WORLD)]
    assert all(p.wait(900) == 0 for p in procs)


def _settled(cluster: Cluster, step: int) -> None:
    """Until every part is replicated and the step is in the bucket."""
    from snapd.client.connection import daemon_status

    deadline = time.monotonic() + 900
    while True:
        sts = [daemon_status(ep, 10.0) for ep in cluster.endpoints]
        replicated = all(p["backlog_parts"] == 0 for st in sts for p in st["peers"]["peers"])
        uploaded = all(st.get("remote") is None or st["remote"]["backlog"] == 0 and
                       st["remote"]["uploading"] is None for st in sts)
        if replicated and uploaded:
            return
        assert time.monotonic() < deadline, sts
        time.sleep(0.2)


RANK_2 = {"rank": LOST, "world_size": WORLD, "run_id": "resume", "per_rank": ["own"]}


def _restore(endpoint: str, part: Path | None = None, job: str = JOB,
             who: dict = RANK_2) -> tuple[float, dict, float]:
    """Rank 2's (``who``'s) ``restore("latest")`` through ``endpoint``, timed from ``connect()`` (the
    daemon starts bringing the part at the hello: snapd.daemon.prefetch). With ``part`` (its manifest
    on the node's disk), the rank first waits for it, as a trainer whose startup outlasts the
    transfer, and only the ``restore()`` call is timed; the third value is then the connect-to-part-
    here time."""
    import snapd.client as snapd

    os.sync()
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    with snapd.connect(job, endpoint=endpoint, spawn=False, **who) as c:
        here = 0.0
        if part is not None:
            while not part.exists():
                assert time.perf_counter() - t0 < 300, f"{part}: not prefetched"
                time.sleep(0.002)
            here = time.perf_counter() - t0
            t0 = time.perf_counter()
        back = c.restore("latest")
        return time.perf_counter() - t0, back, here


def _peer_floor(cluster: Cluster, step: int) -> float:
    """Rank 2's part pulled from node 0's replica into memory (no disk, no check), over the links a
    restore uses (snapd.peers.wire.fetch: ``STREAMS`` at once)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import zmq

    from snapd.format.manifest import parse
    from snapd.peers import wire
    from snapd.peers.keys import PeerKeys

    ctx, keys = zmq.Context(io_threads=wire.STREAMS), PeerKeys.load(cluster.work / "keys")
    links: list[wire.Link] = []
    mine = threading.local()

    def link() -> wire.Link:
        if not hasattr(mine, "link"):
            mine.link = wire.Link(ctx, keys, cluster.peers[0], 60.0)
            links.append(mine.link)
        return mine.link

    base = {"t": "get", "job": JOB, "step": step, "rank": LOST}
    pool = ThreadPoolExecutor(wire.STREAMS)
    try:
        os.sync()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        _, raw = link().request({**base, "file": "manifest.json", "offset": 0, "length": wire.PIECE_BYTES})
        total = 0
        for f in parse(bytes(raw or b"")).files:
            out = np.empty(int(f["bytes"]), np.uint8)

            def put(data: memoryview, at: int, out: np.ndarray = out) -> None:
                out[at:at + len(data)] = np.frombuffer(data, np.uint8)
            wire.fetch(link, pool, {**base, "file": f["name"]}, wire.split(len(out)), put)
            total += len(out)
        took = time.perf_counter() - t0
        assert total >= cluster.mib << 20
        return took
    finally:
        pool.shutdown()
        for x in links:
            x.close()
        ctx.term()


def run(args: argparse.Namespace) -> None:
    import snapd.client as snapd
    from bench import recovery_single
    from bench.machine import Recorder, describe
    from bench.remote import _download_floor, _server
    from bench.restore import drop_cache
    from snapd.remote.store import Store

    work = Path(tempfile.mkdtemp(prefix="snapd-recovery-", dir=args.dir))
    rec = Recorder(args.out / "recovery.jsonl", describe(work))
    server = None if args.no_remote else _server(work)
    url = None if server is None else f"{server.url}/bench"
    cluster = Cluster(work, url, args.mib)
    times: dict[str, list[float]] = {}
    try:
        store = None if url is None else Store.open(url)
        for rep in range(args.reps):
            step = rep + 1
            if rep:  # (the replacement node of the last repetition is a node of the job like the others)
                cluster.procs[LOST].terminate()
                cluster.procs[LOST].wait(120)
                cluster.start(LOST)
            _snapshot(cluster, step)
            _settled(cluster, step)
            want = _state(args.mib, LOST)["own"]
            for method in ("local disk", "local disk, cold"):  # (node 2's own disk)
                if method.endswith("cold"):  # (a node that rebooted: its disk is read)
                    drop_cache(work / f"node{LOST}" / JOB / f"step-{step:012d}")
                took, back, _ = _restore(cluster.endpoints[LOST])
                times.setdefault(method, []).append(took)
                assert all(np.array_equal(back["own"][k], v) for k, v in want.items())
                del back
            times.setdefault("floor: peer link into memory", []).append(_peer_floor(cluster, step))
            if store is not None:
                _download_floor(store, f"bench/{JOB}/step-{step:012d}/rank-{LOST:05d}")
                os.sync()
                time.sleep(SETTLE_S)
                times.setdefault("floor: ranged GETs into memory", []).append(
                    _download_floor(store, f"bench/{JOB}/step-{step:012d}/rank-{LOST:05d}"))
            part = work / f"node{LOST}" / JOB / f"step-{step:012d}" / f"rank-{LOST:05d}" / "manifest.json"
            for wait in (False, True):  # (the replacement: an empty disk; restore from peers only)
                cluster.lose(LOST)
                cluster.start(LOST, remote=False)
                took, back, here = _restore(cluster.endpoints[LOST], part if wait else None)
                times.setdefault(PEERS_AFTER if wait else PEERS, []).append(took)
                if wait:
                    times.setdefault(PREFETCH, []).append(here)
                assert all(np.array_equal(back["own"][k], v) for k, v in want.items())
                del back
            if url is None:
                continue
            shutil.rmtree(work / "fresh", ignore_errors=True)
            os.sync()
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            back = snapd.load(work / "fresh", JOB, step, rank=LOST, remote=url)
            times.setdefault("remote tier (fresh root)", []).append(time.perf_counter() - t0)
            assert all(np.array_equal(back["own"][k], v) for k, v in want.items())
            del back
        for method, values in times.items():
            rec.add("recovery", method, f"rank {LOST} of {WORLD}, {args.mib} MiB raw", values, mib=args.mib)
        single = recovery_single.run(cluster, args.reps)  # (a job on one process: bench/recovery_single.py)
        for method, values in single.items():
            rec.add("recovery", method, f"single process, {args.mib} MiB raw", values, mib=args.mib)
        (args.out / "recovery.md").write_text(_markdown(times, rec.machine, args) + "\n" +
                                              recovery_single.markdown(single, args.mib))
        print((args.out / "recovery.md").read_text())
    except BaseException:
        for log in sorted(work.glob("node*.log")):  # (the daemons' side of what went wrong)
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
        raise
    finally:
        cluster.stop()
        if server is not None:
            server.stop()
        rec.close()
        shutil.rmtree(work, ignore_errors=True)


def _markdown(times: dict, machine: dict, args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    local = med["local disk"]

    def row(name: str) -> str:
        return f"| {name} | {med[name]:.3f} | {args.mib / med[name]:.0f} | {med[name] / local:.2f}x |"

    remote = "remote tier (fresh root)" in med
    link_ratio = med["floor: ranged GETs into memory"] / med["floor: peer link into memory"] if remote else 0
    return "\n".join([
        "# Recovery of a lost node's rank", "",
        f"`python -m bench.recovery --mib {args.mib} --reps {args.reps}` on {machine['cores']} cores, commit "
        f"{machine.get('commit')}: three daemons on loopback TCP with separate roots, "
        f"{'one SeaweedFS server' if remote else 'no remote tier (--no-remote)'}; "
        f"rank {LOST}'s {args.mib} MiB (raw) restored; seconds, median of {args.reps}.", "",
        "| restore of the lost node's rank | seconds | MiB/s | ÷ local disk |", "|---|---|---|---|",
        row("local disk"), row("local disk, cold"), row(PEERS), row(PREFETCH), row(PEERS_AFTER),
        *([row("remote tier (fresh root)")] if remote else []),
        row("floor: peer link into memory"), *([row("floor: ranged GETs into memory")] if remote else []), "",
        f"Peers against local disk with its pages dropped (a node rebooted): "
        f"{med[PEERS] / med['local disk, cold']:.2f}x. " + (
            f"Peers against the remote tier: "
            f"{med['remote tier (fresh root)'] / med[PEERS]:.2f}x faster; the links' own "
            f"speeds differ by {link_ratio:.2f}x (the two floors). On loopback the "
            "peer link and the S3 server share the same cores; across nodes the remote tier's bandwidth is "
            "the bucket's, the peers' the cluster network's." if remote else ""), "",
        f"The replacement node's daemon starts bringing the part when the rank connects: a trainer whose "
        f"startup between `connect()` and `restore()` outlasts that ({med[PREFETCH]:.3f} s here) waits "
        f"{med[PEERS_AFTER]:.3f} s in `restore()` ({med[PEERS_AFTER] / local:.2f}x the warm local disk). "
        "Every row but that one is timed from `connect()`.", ""])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="each rank's state")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--no-remote", action="store_true",
                    help="no remote tier (no S3 server binary there): peers and local disk only")
    return ap


if __name__ == "__main__":
    a = parser().parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(REPO))
    run(a)
