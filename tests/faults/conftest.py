"""The fault suite: real daemons and trainers killed at random points, disks filled, hostile clients.

Each test draws its cases from a seeded generator. CI runs a bounded sample (``--fault-runs``,
default 3 per test); ``pytest tests/faults --fault-runs 40`` runs a long one, and a failing case
names its seed so ``--fault-seed`` replays it.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest



@pytest.fixture
def cases(request) -> list[tuple[int, random.Random]]:
    """(seed, generator) per case: the same seeds every run unless --fault-seed changes them."""
    base, runs = request.config.getoption("--fault-seed"), request.config.getoption("--fault-runs")
    name = request.node.name
    seeds = [random.Random(f"{base}:{name}:{i}").randrange(1 << 30) for i in range(runs)]
    return [(s, random.Random(s)) for s in seeds]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB (a full disk at a chosen point), or a skip where mounting is not allowed."""
    made: list[Path] = []

    def _mount(mib: int) -> Path:
        path = tmp_path / f"disk{len(made)}"
        path.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        made.append(path)
        return path
    yield _mount
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
