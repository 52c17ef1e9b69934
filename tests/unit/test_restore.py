"""Partial restore, restore into an existing tree, and device placement."""

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.errors import KeySelectionError, MismatchError, SnapshotNotFound
from snapd.format import SnapshotReader


def _model_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 1, "extra": np.arange(5)}


def test_partial_restore_reads_only_selected_chunks(root, monkeypatch) -> None:
    state = _model_state()
    snapd.save(root, "j", state, step=1)
    read_keys = []
    orig = SnapshotReader.read_chunk
    monkeypatch.setattr(SnapshotReader, "read_chunk",
                        lambda self, rec, n, out: (read_keys.append(rec.key), orig(self, rec, n, out))[1])
    out = snapd.load(root, "j", keys="model.")
    assert set(out) == {"model"} and set(out["model"]) == set(state["model"])
    assert all(k.startswith("model.") for k in read_keys) and len(read_keys) == len(state["model"])
    out = snapd.load(root, "j", keys=["model.0.weight", "optim.param_groups", "step"])
    assert set(out) == {"model", "optim", "step"} and list(out["model"]) == ["0.weight"]
    assert out["optim"]["param_groups"][0]["lr"] == 1e-3 and out["step"] == 1


def test_missing_key_is_named(root) -> None:
    snapd.save(root, "j", _model_state(), step=1)
    with pytest.raises(KeySelectionError, match="'model.9.weight'"):
        snapd.load(root, "j", keys=["model.0.weight", "model.9.weight"])


def test_into_restores_a_model_in_place(root) -> None:
    state = _model_state()
    snapd.save(root, "j", state, step=1)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    sd = fresh.state_dict()
    ptr = fresh[0].weight.data_ptr()
    snapd.load(root, "j", keys="model", into={"model": sd})
    assert fresh[0].weight.data_ptr() == ptr  # in place, same storage
    for k, v in state["model"].items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_into_lists_every_mismatch_and_changes_nothing(root) -> None:
    snapd.save(root, "j", {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32),
                           "c": np.ones(2, np.float32)}, step=1)
    target = {"a": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float64), "c": np.zeros(2, np.float32),
              "d": np.zeros(1, np.float32)}
    with pytest.raises(MismatchError) as e:
        snapd.load(root, "j", into=target)
    msg = str(e.value)
    assert "a: shape (2, 3)" in msg and "b: dtype float32" in msg and "d: a tensor in `into`" in msg
    assert "c:" not in msg
    assert all((v == 0).all() for v in target.values())  # nothing was overwritten


def test_into_non_contiguous_and_requires_grad_targets(root) -> None:
    snapd.save(root, "j", {"w": torch.arange(12.0).reshape(3, 4), "p": torch.arange(3.0)}, step=1)
    w = torch.zeros(4, 3).t()
    p = torch.nn.Parameter(torch.zeros(3))
    snapd.load(root, "j", into={"w": w, "p": p})
    assert torch.equal(w, torch.arange(12.0).reshape(3, 4)) and torch.equal(p.detach(), torch.arange(3.0))


def test_device_places_torch_tensors(root) -> None:
    snapd.save(root, "j", {"t": torch.ones(3), "n": np.ones(2)}, step=1)
    out = snapd.load(root, "j", device="cpu")
    assert out["t"].device.type == "cpu"
    out = snapd.load(root, "j", device=torch.device("meta"), keys="t")
    assert out["t"].device.type == "meta"


def test_unknown_step_and_job(root) -> None:
    snapd.save(root, "j", {"w": np.zeros(1)}, step=3)
    with pytest.raises(SnapshotNotFound, match=r"no snapshot 4 \(steps: 3\)"):
        snapd.load(root, "j", step=4)
    with pytest.raises(SnapshotNotFound, match="no job 'k'"):
        snapd.load(root, "k")
    with pytest.raises(SnapshotNotFound, match="tracks no best"):
        snapd.load(root, "j", step="best")


def test_tensors_passing_through_host_memory_hold_about_two_windows_of_it(root, monkeypatch) -> None:
    """Targets read through a temporary (non-contiguous ones here; a restore onto a GPU the same
    way, its upload in place of the copy) get it when the reader comes to them and give it up once
    read: 32 MiB of state read in 2 MiB windows never holds the 32 MiB of temporaries at once."""
    import tracemalloc

    from snapd.format import windowed_reads

    rng = np.random.default_rng(0)
    state = {f"t{i}": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(16)}  # 2 MiB each
    snapd.save(root, "j", state, step=1, codec="shuffle-lz4")
    target = {k: np.zeros((1024, 512), np.float32).T for k in state}  # (non-contiguous: not read in place)
    monkeypatch.setattr(windowed_reads, "WINDOW_BYTES", 4 << 20)
    tracemalloc.start()
    try:
        snapd.load(root, "j", into=target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(np.array_equal(target[k], state[k]) for k in state)
    assert peak < 16 << 20, f"{peak >> 20} MiB held at the peak"  # (32 MiB if every temporary lived on)


def test_windows_hand_each_tensor_on_once_in_order(root) -> None:
    state = {f"t{i}": np.full(1000 * (i + 1), i, np.float64) for i in range(12)}
    from snapd.format.saving import save_state

    info = save_state(root, "j", state, step=1, chunk_bytes=8192)
    with SnapshotReader(info.path) as r:
        asked, done, held = [], [], []
        bufs = {i: bytearray(t.nbytes) for i, t in enumerate(r.manifest.tensors)}

        def buffer_for(i):
            asked.append(i)
            return memoryview(bufs[i])

        def finished(i):
            done.append(i)
            held.append(sum(r.manifest.tensors[j].nbytes for j in set(asked) - set(done)))
        r.read_tensors(list(range(12)), buffer_for, threads=3, done=finished, window_bytes=40_000)
        names = [t.key for t in r.manifest.tensors]
    assert done == asked == list(range(12))  # each once, in order
    assert max(held) <= 2 * 40_000 + 8 * 12_000, held  # this window and the next (a tensor may overflow one)
    for i, name in enumerate(names):
        assert np.frombuffer(bufs[i], np.float64).tobytes() == state[name].tobytes()


def test_best_without_its_metric_is_refused_and_a_cuda_load_without_cuda_is_said_in_snapds_words(
        tmp_path) -> None:
    import numpy as np
    import pytest
    import torch

    import snapd.client as snapd
    from snapd.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="metrics has no 'val_loss'"):
        snapd.save(tmp_path, "j", {"w": np.ones(2)}, step=1, metrics={"loss": 1.0}, best=("val_loss", "min"))
    assert not (tmp_path / "j").exists() or not list((tmp_path / "j").glob("step-*"))
    snapd.save(tmp_path, "j", {"w": torch.ones(2)}, step=1)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="no CUDA device is usable"):
            snapd.load(tmp_path, "j", device="cuda:0")


def test_a_reading_pool_has_all_its_threads_running_before_its_first_task() -> None:
    import threading

    from snapd.format.pools import started_pool

    with started_pool(5, "snapd-test-pool") as pool:
        running = [t for t in threading.enumerate() if t.name.startswith("snapd-test-pool")]
        assert len(running) == 5 and all(t.is_alive() for t in running)
        assert sorted(pool.map(lambda x: x * 2, range(20))) == [x * 2 for x in range(20)]
    assert not [t for t in threading.enumerate() if t.name.startswith("snapd-test-pool")]
