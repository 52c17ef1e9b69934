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
