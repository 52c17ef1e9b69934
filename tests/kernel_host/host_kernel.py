"""The GPU segment kernel (kernels/segments.cu) built for the host with g++ (through
``emulate.cpp`` and ``cuda_shim.h`` beside this file) and run over host memory, launch by launch as
``snapd.kernels.segments`` cuts them. Used by the unit tests and by the stand-in GPU of the
integration tests (tests/integration/fake_cuda.py).

A launch raises when the lanes of a warp reach different ``__syncwarp`` calls, or when a 16-byte
access is one a GPU would fault on (misaligned, or outside every segment of the launch).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from snapd.kernels.segments import MAX_BLOCKS, THREADS, Launch, Segment, launches

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "kernels"


def build(out_dir: Path) -> Path | None:
    """The emulated kernel as a shared library under ``out_dir``; None where there is no g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    lib = out_dir / "segments_host.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    f"-DSNAPD_THREADS={THREADS}", f"-I{KERNELS}", f"-I{HERE}", "-o", str(lib),
                    str(HERE / "emulate.cpp")], check=True, capture_output=True, text=True)
    return lib


class HostKernel:
    def __init__(self, lib: Path) -> None:
        so = ctypes.CDLL(str(lib))
        so.snapd_emulate.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint]
        so.snapd_emulate.restype = ctypes.c_int
        so.snapd_fault.restype = ctypes.c_char_p
        self._so = so

    def run(self, segs: list[Segment], max_blocks: int = MAX_BLOCKS) -> None:
        """Run ``[(src, dst, m, k, mode), ...]`` over host addresses (``max_blocks``: blocks a segment)."""
        self.run_launches(launches(segs, max_blocks))

    def run_launches(self, prepared: list[Launch]) -> None:
        """Run launches made by ``snapd.kernels.segments.launches``, as the CUDA backend's
        ``run_launches``."""
        for launch in prepared:
            table = np.ascontiguousarray(launch.table)
            status = self._so.snapd_emulate(table.ctypes.data, launch.segments, launch.blocks, launch.block)
            if status == -2:
                raise AssertionError(self._so.snapd_fault().decode())
            if status != 0:
                raise AssertionError("lanes of a warp reached different __syncwarp calls")
