"""The integration tests' stand-in GPU (tests/integration/fake_cuda.py), for the benchmarks that
measure the GPU path's CPU side where there is no GPU (bench.stall_fake_gpu, bench.gpu_prep_fake)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def stand_in(work: Path) -> tuple[types.ModuleType, Path]:
    """The ``fake_cuda`` module and the segment kernel built for the host under ``work``; exits
    saying so where there is no g++ to build it."""
    for folder in ("integration", "kernel_host"):
        if str(TESTS / folder) not in sys.path:
            sys.path.insert(0, str(TESTS / folder))
    import fake_cuda
    import host_kernel

    lib = host_kernel.build(work)
    if lib is None:
        raise SystemExit("needs g++ to build the segment kernel for the host")
    return fake_cuda, lib
