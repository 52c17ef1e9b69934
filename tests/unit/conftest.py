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
