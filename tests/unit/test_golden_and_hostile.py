"""Released snapshots keep loading byte-exact; hostile files fail cleanly."""

import json
import shutil
from pathlib import Path

import pytest

import snapd.client as snapd
import snapd.errors as errors
from snapd.cli import main as cli
from snapd.format import SnapshotReader

DATA = Path(__file__).resolve().parent.parent / "data"
GOLDEN = sorted(p for p in DATA.iterdir() if p.name.startswith("golden-v"))
HOSTILE = sorted((DATA / "corrupt").iterdir())


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda p: p.name)
def test_golden_snapshots_load_byte_exact(golden, digest) -> None:
    expected = json.loads((golden / "expected.json").read_text())
    assert len(expected) == 4  # one job per codec
    for job, tensors in expected.items():
        out = snapd.load(golden, job, step=1200)
        flat = {"model.encoder.weight": out["model"]["encoder.weight"],
                "model.encoder.bias": out["model"]["encoder.bias"],
                "model.head.weight": out["model"]["head.weight"],
                "model.embed": out["model"]["embed"], "optim.state.0.step": out["optim"]["state"][0]["step"],
                "optim.state.0.exp_avg": out["optim"]["state"][0]["exp_avg"]}
        flat.update({f"counters.{k}": v for k, v in out["counters"].items()})
        assert set(flat) == set(tensors)
        for key, exp in tensors.items():
            assert digest(flat[key]) == exp["sha256"], (job, key)
            assert list(flat[key].shape) == exp["shape"]
        assert out["optim"]["param_groups"] == [{"lr": 3e-4, "betas": (0.9, 0.999), "params": [0]}]
        assert out["meta"]["blob"] == b"\x00\x01snapd" and out["meta"]["nan"] != out["meta"]["nan"]
        assert out["counters"]["scalar"] == 2.5 and out["counters"]["zero_d"].shape == ()


@pytest.mark.parametrize("case", HOSTILE, ids=lambda p: p.name)
def test_hostile_snapshot_fails_with_named_problem(case, tmp_path, capsys) -> None:
    cls_name, fragment = (case / "expect.txt").read_text().rstrip("\n").split("\t")
    cls = getattr(errors, cls_name)
    assert issubclass(cls, errors.FormatError)
    with pytest.raises(cls) as e:
        with SnapshotReader(case / "snapshot") as r:
            r.load()
    assert fragment in str(e.value)
    # the CLI reports it as damage (exit 1), one line, no traceback
    assert cli(["verify", str(case / "snapshot")]) == 1
    out = capsys.readouterr()
    assert fragment in out.out and "Traceback" not in out.out + out.err
    # a job whose newest snapshot is hostile still serves its older, good ones
    job = tmp_path / "j"
    snapd.save(tmp_path, "j", {"w": [1]}, step=1)
    shutil.copytree(case / "snapshot", job / "step-000000000002")
    assert snapd.load(tmp_path, "j", step=1) == {"w": [1]}


def test_the_format_2_global_snapshot_loads_byte_exact_on_each_rank(digest, capsys) -> None:
    """tests/data/global-v2: a job saved on 2 ranks (tests/data/make_golden_global.py)."""
    golden = DATA / "global-v2"
    expected = json.loads((golden / "expected.json").read_text())
    for rank, tensors in expected.items():
        out = snapd.load(golden, "golden-global", step=1200, rank=int(rank))
        flat = {"model.rows": out["model"]["rows"], "model.cols": out["model"]["cols"],
                "model.bias": out["model"]["bias"], "rng": out["rng"]}
        assert set(flat) == set(tensors)
        for key, exp in tensors.items():
            assert digest(flat[key]) == exp["sha256"], (rank, key)
            assert list(flat[key].shape) == exp["shape"]
        assert out["step"] == 1200 and out["note"] == b"\x00v2" and int(out["rng"][0]) == 1000 + int(rank)
    assert cli(["verify", str(golden / "golden-global")]) == 0
    assert "ok " in capsys.readouterr().out
