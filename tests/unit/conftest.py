"""Fixtures of the unit tests."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("snapd_tests_host_kernel",
                                               REPO / "tests" / "kernel_host" / "host_kernel.py")
host_kernel_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_kernel_module)


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory) -> Callable[..., None]:
    """``run(segments, max_blocks=MAX_BLOCKS)``: the GPU segment kernel (kernels/segments.cu), built
    with g++ through tests/kernel_host and run over host memory, launch by launch as
    kernels.segments cuts them (``max_blocks``: blocks a segment, fewer to make the blocks loop).
    A launch fails the test when the lanes of a warp reach different ``__syncwarp`` calls, or
    when a 16-byte access is one a GPU would fault on (tests/kernel_host/host_kernel.py). Skips
    where there is no g++."""
    lib = host_kernel_module.build(tmp_path_factory.mktemp("kernel"))
    if lib is None:
        pytest.skip("no g++ to build the segment kernel for the host")
    return host_kernel_module.HostKernel(lib).run


@pytest.fixture
def rank_part() -> Callable[..., tuple]:
    """``rank_part(root, job, step, rank, world, value=1.0, n=1000)``: seal rank ``rank``'s part of
    ``step`` as a node's daemon does and deliver it under ``root``: (its JobDir, the sealed part's
    manifest, the delivery)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from snapd.format.global_commit import deliver
    from snapd.format.jobdir import JobDir
    from snapd.format.rank_parts import roles
    from snapd.format.retention import Retention
    from snapd.format.saving import encode_and_write
    from snapd.format.tree import flatten
    from snapd.format.writer import SnapshotWriter

    def part(root, job: str, step: int, rank: int, world: int, value: float = 1.0, n: int = 1000,
             taken: float | None = None) -> tuple:
        jd = JobDir(root, job)
        jd.open_for_write()
        tree, leaves = flatten({"own": np.full(n, value + rank, np.float32)})
        w = SnapshotWriter(jd, step)
        w.taken_unix_s = taken
        with ThreadPoolExecutor(2) as pool:
            encode_and_write(w, leaves, "raw", pool, 2, 1 << 20, roles=roles(leaves, rank, world, ("own",)))
        sealed = w.seal(tree=tree, metrics={}, codec="raw", best=None, emergency=False,
                        part={"rank": rank, "world_size": world, "run": "r1"})
        return jd, sealed, deliver(jd, w.tmp, sealed, Retention())
    return part


@pytest.fixture
def committed_step() -> Callable[..., bytes]:
    """``committed_step(root, job="g", step=3)``: a 2-rank job's step committed under ``root`` (both
    ranks saved at once, as two trainers without a daemon): its global manifest's bytes."""
    import threading

    import numpy as np

    import snapd.client as snapd

    def commit(root: Path, job: str = "g", step: int = 3) -> bytes:
        def save(rank: int) -> None:
            snapd.save(root, job, {"own": np.full(1000, rank, np.int64)}, step=step, rank=rank, world_size=2,
                       run_id="r", per_rank=["own"], commit_timeout_s=30)
        threads = [threading.Thread(target=save, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (root / job / f"step-{step:012d}" / "manifest.json").read_bytes()
    return commit


@pytest.fixture
def curve_routers():
    """``curve_routers(keys_list, answer)``: a CurveZMQ ROUTER bound to a loopback port per PeerKeys
    of the list, as peer servers: [(socket, endpoint)], on a context (``curve_routers.ctx``) termed
    after the test. A thread answers each request that reaches socket ``i`` with ``answer(i,
    header)`` (None: no answer, a peer that hangs), until the test ends."""
    import threading

    import zmq

    from snapd.peers import wire

    ctx = zmq.Context()
    made: list = []
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def make(keys_list: list, answer: Callable[[int, dict], dict | None]) -> list:
        out = []
        for k in keys_list:
            s = ctx.socket(zmq.ROUTER)
            s.curve_server, s.curve_secretkey, s.curve_publickey, s.linger = True, k.secret, k.public, 0
            out.append((s, f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"))
        made.extend(s for s, _ in out)

        def serve() -> None:
            poller = zmq.Poller()
            for s, _ in out:
                poller.register(s, zmq.POLLIN)
            while not stop.is_set():
                for s, _ in poller.poll(50):
                    peer, *frames = s.recv_multipart()
                    reply = answer([x for x, _ in out].index(s), wire.decode(frames)[0])
                    if reply is not None:
                        s.send_multipart([peer, *wire.encode(reply)])
        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        return out
    make.ctx = ctx  # type: ignore[attr-defined]
    yield make
    stop.set()
    for t in threads:
        t.join()
    for s in made:
        s.close()
    ctx.term()
