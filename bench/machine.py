"""What a benchmark ran on, and the JSON-lines file every measurement goes to."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil


def _disk(path: Path) -> dict[str, Any]:
    """The block device under ``path``: name, whether it spins, its size (from /sys)."""
    dev = os.stat(path).st_dev
    name = ""
    try:
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        base = Path(f"/sys/class/block/{name}")
        if (base / "partition").exists():
            base = base.parent
        rotational = (base / "queue" / "rotational").read_text().strip() == "1"
        model = (base / "device" / "model").read_text().strip() if (base / "device"
                                                                    / "model").exists() else ""
    except OSError:
        rotational, model = None, ""
    st = os.statvfs(path)
    return {"device": name, "model": model, "rotational": rotational, "free_bytes": st.f_bavail * st.f_frsize}


def _commit() -> str | None:
    """The checkout's commit (``+`` when its tracked files differ from it), or None outside one."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, timeout=10).returncode
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+" if dirty else "") if head.returncode == 0 else None


def describe(work: Path) -> dict[str, Any]:
    import snapd

    versions = {"python": platform.python_version(), "numpy": np.__version__, "snapd": snapd.__version__}
    for mod in ("torch", "safetensors", "zmq"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"host": platform.node(), "kernel": platform.release(), "cores": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "disk": _disk(work), "versions": versions,
            "commit": _commit()}  # (rows of several commits share one results file: this tells them apart)


class Recorder:
    """One JSON line per measurement, each carrying the machine it was taken on."""

    def __init__(self, path: Path, machine: dict[str, Any]) -> None:
        self.path = path
        self.machine = machine
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w")

    def add(self, scenario: str, method: str, metric: str, values: list[float], unit: str = "s",
            **extra: Any) -> None:
        row = {"time": time.time(), "scenario": scenario, "method": method, "metric": metric, "unit": unit,
               "values": [round(v, 6) for v in values], **extra, "machine": self.machine}
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        print(f"  {scenario:<12} {method:<40} {metric:<22} {_short(values)} {unit}", flush=True)

    def close(self) -> None:
        self._f.close()


def _short(values: list[float]) -> str:
    v = sorted(values)
    return f"{v[len(v) // 2]:.4g}" + (f" ({v[0]:.4g}-{v[-1]:.4g})" if len(v) > 1 else "")
