"""Fixtures of the unit tests."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from snapd.kernels.segments import THREADS, Segment, launches

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory) -> Callable[..., None]:
    """``run(segments, grid_x=None)``: the GPU segment kernel (kernels/segments.cu), built with g++
    through tests/kernel_host and run over host memory, launch by launch as kernels.segments cuts
    them (``grid_x`` overrides the grid's width). Skips where there is no g++."""
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

    def run(segs: list[Segment], grid_x: int | None = None) -> None:
        for launch in launches(segs):
            table = np.ascontiguousarray(launch.table)
            status = so.snapd_emulate(table.ctypes.data, table.shape[0], grid_x or launch.grid[0], launch.block)
            assert status == 0, "lanes of a warp reached different __syncwarp calls"
    return run
