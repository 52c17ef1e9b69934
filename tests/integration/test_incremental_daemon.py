"""The daemon writes only what changed since a job's previous snapshot (and everything with
``--incremental off``), and every snapshot restores bit-exact."""

import json
from pathlib import Path

import torch

import snapd.client as snapd
from snapd.cli import main as cli


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    frozen = {f"layer{i}": torch.randn(1024, 1024, generator=g) for i in range(4)}  # 16 MiB
    return {"frozen": frozen, "adapter": torch.full((64, 1024), float(step)), "step": step}


def _written(path: Path) -> int:
    files = json.loads((Path(path) / "manifest.json").read_text())["files"]
    return sum(f["bytes"] for f in files if "shard" not in f)


def _run(endpoint: str) -> list:
    with snapd.connect("ft", endpoint=endpoint, spawn=False, keep_last=None) as c:
        infos = [c.snapshot(_state(step), step=step).wait(timeout=60) for step in range(1, 4)]
        for step in range(1, 4):
            out = c.restore(step)
            assert out["step"] == step and torch.equal(out["adapter"], _state(step)["adapter"])
            assert all(torch.equal(out["frozen"][k], v) for k, v in _state(step)["frozen"].items())
    return infos


def test_the_daemon_writes_only_what_changed(start) -> None:
    daemon = start("--codec", "shuffle-zstd")
    infos = _run(daemon.endpoint)
    assert _written(infos[0].path) > 12 << 20  # (16 MiB of fp32, shuffled and compressed)
    for info in infos[1:]:
        assert _written(info.path) < 300 << 10, info  # the 256 KiB adapter, not the base
    assert cli(["verify", str(daemon.root / "ft")]) == 0
    assert "shared" in daemon.log_text()


def test_incremental_off_writes_every_byte(start) -> None:
    d = start("--incremental", "off", "--codec", "raw")
    infos = _run(d.endpoint)
    assert all(_written(i.path) > 16 << 20 for i in infos)
