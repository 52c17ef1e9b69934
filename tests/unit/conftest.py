"""Fixtures of the unit tests."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from snapd.kernels.segments import MAX_BLOCKS, THREADS, Segment, launches

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory) -> Callable[..., None]:
    """``run(segments, max_blocks=MAX_BLOCKS)``: the GPU segment kernel (kernels/segments.cu), built
    with g++ through tests/kernel_host and run over host memory, launch by launch as
    kernels.segments cuts them (``max_blocks``: blocks a segment, fewer to make the blocks loop).
    A launch fails the test when the lanes of a warp reach different ``__syncwarp`` calls, or
    when a 16-byte access is one a GPU would fault on (tests/kernel_host/emulate.cpp). Skips
    where there is no g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the segment kernel for the host")
    lib = tmp_path_factory.mktemp("kernel") / "segments_host.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    f"-DSNAPD_THREADS={THREADS}", f"-I{REPO / 'kernels'}", f"-I{REPO / 'tests' / 'kernel_host'}",
                    "-o", str(lib), str(REPO / "tests" / "kernel_host" / "emulate.cpp")],
                   check=True, capture_output=True, text=True)
    so = ctypes.CDLL(str(lib))
    so.snapd_emulate.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint]
    so.snapd_emulate.restype = ctypes.c_int
    so.snapd_fault.restype = ctypes.c_char_p

    def run(segs: list[Segment], max_blocks: int = MAX_BLOCKS) -> None:
        for launch in launches(segs, max_blocks):
            table = np.ascontiguousarray(launch.table)
            status = so.snapd_emulate(table.ctypes.data, launch.segments, launch.blocks, launch.block)
            assert status != -2, so.snapd_fault().decode()
            assert status == 0, "lanes of a warp reached different __syncwarp calls"
    return run
