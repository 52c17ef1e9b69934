"""DCP reads snapd snapshots (``snapd.dcp.SnapshotReader``): a state one process saved with snapd loads
through ``dcp.load`` into the same state, and into a model sharded by FSDP2 on another world size,
giving exactly what DCP's own save and load of the same state give (compared in the same run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import snapd.client as snapd
from snapd.dcp import SnapshotReader, dcp_leaves
from snapd.format.catalog import resolve
from snapd.format.reader import SnapshotReader as FormatReader

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_dcp_load.py"


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        model(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)  # (optimizer state keyed by parameter names, as FSDP2's is)
    return {"model": msd, "optim": osd, "step": 7, "extra": {"bf16": torch.arange(6, dtype=torch.bfloat16),
                                                            "tag": b"\x00\x01", "betas": (0.9, 0.999)}}


def _zeros_like(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros_like(v) for v in state]
    return None if not isinstance(state, tuple) else ()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_dcp_load_of_a_snapd_snapshot_gives_what_dcps_own_checkpoint_gives(tmp_path) -> None:
    state = _state(*_trained())
    snapd.save(tmp_path / "root", "j", state, step=7)
    dcp.save(state, checkpoint_id=tmp_path / "dcp", no_dist=True)

    ours, theirs = _zeros_like(state), _zeros_like(state)
    # (the job's directory: its latest snapshot)
    dcp.load(ours, storage_reader=SnapshotReader(tmp_path / "root" / "j"), no_dist=True)
    dcp.load(theirs, checkpoint_id=tmp_path / "dcp", no_dist=True)
    assert _equal(ours, theirs) and _equal(ours, state)
    # DCP's checkpoint_id= route finds the reader by the path too
    again = _zeros_like(state)
    dcp.load(again, checkpoint_id=resolve(tmp_path / "root", "j"), storage_reader=SnapshotReader(),
             no_dist=True)
    assert _equal(again, state)


def test_the_reader_names_what_dcp_keeps_whole_as_dcp_does(tmp_path) -> None:
    """Dicts and lists holding tensors are walked into; tuples and lists of plain values are one item."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    state = _state(*_trained())
    snapd.save(tmp_path, "j", state, step=1)
    with FormatReader(resolve(tmp_path, "j")) as r:
        ours = {key for key, _ in dcp_leaves(r.manifest.tree)}
    assert ours == set(flatten_state_dict(state)[0])


def test_a_missing_key_and_a_wrong_shape_are_refused_clearly(tmp_path) -> None:
    snapd.save(tmp_path, "j", {"w": torch.ones(4, 3)}, step=1)
    reader = SnapshotReader(tmp_path / "j")
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: v"):  # (DCP's words)
        dcp.load({"w": torch.zeros(4, 3), "v": torch.zeros(1)}, storage_reader=reader, no_dist=True)
    with pytest.raises(CheckpointException, match="Size mismatch|size|shape"):
        dcp.load({"w": torch.zeros(5, 3)}, storage_reader=SnapshotReader(tmp_path / "j"), no_dist=True)
    with pytest.raises(snapd.SnapshotNotFound, match="neither a snapshot directory nor a job directory"):
        SnapshotReader(tmp_path / "nothing")
    assert not SnapshotReader.validate_checkpoint_id(tmp_path / "nothing")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_single_process_snapshot_loads_into_fsdp2_shards_on_two_ranks(tmp_path, torchrun) -> None:
    """Restore on another world size: saved by one process, loaded by two FSDP2 ranks (gloo, CPU),
    each rank's shards equal to what DCP gives from its own checkpoint of the same state."""
    state = _state(*_trained())
    del state["extra"]
    snapd.save(tmp_path / "root", "j", state, step=7)
    dcp.save(state, checkpoint_id=tmp_path / "dcp", no_dist=True)
    out = torchrun(SCRIPT, str(resolve(tmp_path / "root", "j")), str(tmp_path / "dcp"))
    assert sorted(re.findall(r"LOADED (\d)", out.stdout)) == ["0", "1"], out.stdout + out.stderr


def test_a_piece_is_read_from_the_chunks_that_hold_it_only(tmp_path, monkeypatch) -> None:
    """An FSDP2 shard is a run of rows: of a tensor stored in many chunks, only those holding the
    rows are read (and checked); any piece, rows or not, equals the same slice of the tensor."""
    import numpy as np

    from snapd.dcp import read_piece
    from snapd.format.saving import save_state

    w = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    b = torch.arange(5 * 6 * 7, dtype=torch.bfloat16).reshape(5, 6, 7)
    for codec in ("raw", "shuffle-zstd"):
        save_state(tmp_path, codec, {"w": w, "b": b}, step=1, codec=codec, chunk_bytes=1024)
        read: list[int] = []
        real = FormatReader.read_chunk

        def counting(self, rec, n, out, keep_planes=False, read=read, real=real):
            read.append(n)
            return real(self, rec, n, out, keep_planes)
        monkeypatch.setattr(FormatReader, "read_chunk", counting)
        with FormatReader(resolve(tmp_path, codec)) as r:
            piece = read_piece(r, 0, [16, 0], [16, 48])  # rows 16..31: bytes 3072..6144 of 12288
            assert torch.equal(piece, w[16:32]) and sorted(read) == [3, 4, 5]
            rng = np.random.default_rng(0)
            for _ in range(40):
                i, t = (0, w) if rng.random() < 0.5 else (1, b)
                offsets = [int(rng.integers(0, d)) for d in t.shape]
                lengths = [int(rng.integers(0, d - o + 1)) for o, d in zip(offsets, t.shape)]
                want = t[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
                assert torch.equal(read_piece(r, i, offsets, lengths), want), (i, offsets, lengths)
            with pytest.raises(snapd.FormatError, match="not inside"):
                read_piece(r, 0, [60, 0], [8, 48])
        monkeypatch.undo()
