from __future__ import annotations

import hashlib
import os

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-runs", type=int, default=int(os.environ.get("SNAPD_FAULT_RUNS", "3")),
                     help="cases each test of tests/faults draws (CI: 3)")
    parser.addoption("--fault-seed", type=int, default=int(os.environ.get("SNAPD_FAULT_SEED", "20261204")),
                     help="the seed tests/faults draws its cases from")
    parser.addoption("--world-sizes", choices=("sample", "all"),
                     default=os.environ.get("SNAPD_WORLD_SIZES", "sample"),
                     help="the world sizes multi-rank tests reshard onto: all of them, or (CI) one each, "
                          "drawn with --fault-seed")


@pytest.fixture
def world_sizes(request: pytest.FixtureRequest):
    """``pick(sizes)``: the world sizes a reshard test loads onto. Each is a torchrun of its own (a
    few seconds on 2 cores), so CI runs one of them, drawn from --fault-seed and the test's name
    (the same one every run of a seed); ``--world-sizes all`` runs every one."""
    import random
    import zlib

    def pick(sizes: tuple[int, ...]) -> tuple[int, ...]:
        if request.config.getoption("--world-sizes") == "all":
            return sizes
        seed = request.config.getoption("--fault-seed") ^ zlib.crc32(request.node.nodeid.encode())
        return (random.Random(seed).choice(sizes),)
    return pick


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import cupy

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "snapshots"
    d.mkdir()
    return d


@pytest.fixture
def digest():
    return tensor_digest


@pytest.fixture
def py():
    return run_python


def tensor_digest(arr: object) -> str:
    """SHA-256 of a tensor's bytes (NumPy or torch, any dtype)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(arr, torch.Tensor):
        arr = arr.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()


def run_python(code: str, *args: str, **kw: object):
    """Run ``code`` in a fresh interpreter, from ``/`` unless told (as a job or a daemon runs)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=kw.pop("cwd", "/"), timeout=kw.pop("timeout", 120), **kw)  # type: ignore[arg-type]
