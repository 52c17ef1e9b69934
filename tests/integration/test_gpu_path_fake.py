"""The GPU path's logic on every CI run, on a stand-in GPU (tests/integration/fake_cuda.py): the
trainer's device arrays go to a real daemon subprocess as IPC handles, the daemon's copier maps
them, packs and shuffles them through its staging windows with the kernel's own source (built for
the host), and the snapshot on disk is byte for byte the one a CPU save writes. Stream ordering
and the real driver are tests/gpu's (skipped without a GPU)."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd
from snapd.client import snapshot_plan
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.saving import save_state


def _values(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((513, 257)).astype(np.float32),  # 0.5 MiB: windows of 256 KiB cut it
            "d": rng.standard_normal(7), "h": rng.standard_normal(4097).astype(np.float16),
            "i": rng.integers(-1 << 40, 1 << 40, 1001), "m": rng.random(999) > 0.5,
            "c": (rng.standard_normal(33) + 1j * rng.standard_normal(33)).astype(np.complex64),
            "u": rng.integers(0, 256, 300_001, dtype=np.uint8), "e": np.zeros(0, np.float32)}


def _device_state(gpu, values: dict) -> dict:
    """The values on the stand-in device, two of them sub-blocks of one allocation at odd offsets."""
    bid, base = gpu.alloc(1 << 20)
    slab = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    return {"model": {k: gpu.array(v) for k, v in values.items()},
            "views": {"a": gpu.array(slab[:77_777], within=(bid, base + 4 * 3)),
                      "b": gpu.array(slab[:5], within=(bid, base + 4 * 200_001))},
            "cpu": {"np": np.arange(10, dtype=np.int32)}, "step": 3}


def _host(tree):
    """The tree with its device arrays read back (what the snapshot must hold)."""
    if isinstance(tree, dict):
        return {k: _host(v) for k, v in tree.items()}
    return tree.host().copy() if hasattr(tree, "host") else tree


def _same(got, want) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape and \
            got.tobytes() == want.tobytes()
    return got == want


def _chunks(path) -> list:
    """Each tensor's chunks as stored: codec, lengths and the checksum of the stored bytes (not where
    they lie: an incremental snapshot leaves unchanged chunks in an earlier one's file; nor the
    digests: the GPU path hashes the byte planes it staged, "p...", a CPU save the raw bytes)."""
    return [[{k: v for k, v in c.items() if k not in ("digest", "file", "offset")} for c in t["chunks"]]
            for t in json.loads((path / MANIFEST_NAME).read_text())["tensors"]]


@pytest.mark.parametrize("codec", ["shuffle-zstd", "shuffle-lz4", "raw"])
def test_device_arrays_go_by_ipc_and_land_as_a_cpu_save_writes_them(fake_gpu, tmp_path, codec,
                                                                    caplog) -> None:
    d = fake_gpu.start("--codec", codec)
    state = _device_state(fake_gpu, _values(0))
    want = _host(state)
    device_bytes = sum(v.nbytes for part in ("model", "views") for v in want[part].values())
    with caplog.at_level(logging.WARNING), snapd.connect("g", endpoint=d.endpoint, spawn=False) as c:
        p = c.snapshot(state, step=1)
        assert not p.copied  # "received": the daemon copies from the device after replying
        info = p.wait(30)
        [mine] = c.status()["clients"]
        back = c.restore()
    assert "staged by this process" not in caplog.text
    assert f"GPU path: CUDA IPC from devices {fake_gpu.uuid(0)}" in d.log_text()
    assert mine["last_snapshot"]["bytes"] == {"cuda_ipc": device_bytes, "registered": 0, "inline": 40,
                                              "client": 0}
    assert _same(back, want)  # (device arrays come back as NumPy where there is no CuPy)
    ref = save_state(tmp_path / "cpu", "g", want, step=1, codec=codec, chunk_bytes=64 << 10)
    assert _chunks(info.path) == _chunks(ref.path)  # shuffled on the "device", the same stored bytes


def test_a_device_state_unchanged_since_the_last_snapshot_is_not_written_again(fake_gpu) -> None:
    d = fake_gpu.start("--codec", "shuffle-zstd")
    state = _device_state(fake_gpu, _values(0))
    with snapd.connect("inc", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        first = c.snapshot(state, step=1).wait(30)
        state["model"]["h"].host()[...] = 1.0  # one tensor changes
        second = c.snapshot(state, step=2).wait(30)
        back = c.restore(2)
    m1, m2 = (json.loads((i.path / MANIFEST_NAME).read_text()) for i in (first, second))
    assert any(c["digest"].startswith("p") for t in m1["tensors"] for c in t["chunks"] if "planes" in c)
    shared = [f for f in m2["files"] if "shard" in f]
    assert shared and sum(f["bytes"] for f in m2["files"] if "shard" not in f) < first.stored_bytes / 4
    assert _same(back, _host(state))


def test_each_step_of_a_loop_restores_and_handles_follow_the_allocations(fake_gpu, sent, monkeypatch) -> None:
    """Snapshots of the same arrays replay the layout's memo (no flattening); values changed after
    each copy reach only the next snapshot. An allocation freed and made anew gets a new handle,
    the old one is closed once no snapshot uses it, and the rest when the client leaves."""
    flattens = []
    real = snapshot_plan.flattened
    monkeypatch.setattr(snapshot_plan, "flattened", lambda *a, **k: flattens.append(1) or real(*a, **k))
    d = fake_gpu.start("--codec", "shuffle-lz4")
    state = {"w": fake_gpu.array(np.zeros(70_000, np.float32)), "b": fake_gpu.array(np.zeros(33, np.float64)),
             "step": 0}
    wants = []
    with snapd.connect("loop", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        for step in range(4):
            state["w"].host()[...] = step + np.arange(70_000, dtype=np.float32)
            state["b"].host()[...] = -step
            state["step"] = step
            wants.append(_host(state))
            c.snapshot(state, step=step).wait_copied(30)  # then the trainer may change them
        assert "tensors" in sent[0] and all("tensors" not in f and "layout" in f for f in sent[1:])
        assert len(flattens) == 1  # the first snapshot only
        fake_gpu.free(state["w"].allocation)
        state["w"] = fake_gpu.array(np.full(70_000, 9.0, np.float32))  # another allocation
        state["step"] = 4
        wants.append(_host(state))
        c.snapshot(state, step=4).wait(30)
        assert "tensors" in sent[-1] and len(flattens) == 2  # another address: flattened, a new handle
        for step, want in enumerate(wants):
            assert _same(c.restore(step), want), step
        assert _log_count(d, "fake cuda: opened") == 3
        assert _log_count(d, "fake cuda: closed") == 1  # the freed allocation's
        assert _log_count(d, "GPU copy plan: 2 tensors") == 2  # made for each layout, run for each snapshot
    d.wait_for(lambda: _log_count(d, "fake cuda: closed") == 3)  # the rest, once the client left


def test_device_arrays_are_kept_alive_while_the_daemon_maps_them_and_not_after(fake_gpu) -> None:
    """The trainer may drop its arrays right after snapshot() (a fresh state_dict each step): the
    client keeps them until the daemon has copied them, even when the trainer never fences, and
    then one array of each allocation the daemon still maps (CUDA leaves freeing memory another
    process maps undefined): until a snapshot that no longer uses it is copied, or ``bye``."""
    d = fake_gpu.start()
    with snapd.connect("alive", endpoint=d.endpoint, spawn=False) as c:
        bid, base = fake_gpu.alloc(1 << 20)
        arr = fake_gpu.array(np.arange(50_000, dtype=np.float32), within=(bid, base))
        # the same allocation
        twin = fake_gpu.array(np.zeros(1000, np.float32), within=(bid, base + (512 << 10)))
        other = fake_gpu.array(np.arange(77, dtype=np.float64))
        p = c.snapshot({"w": arr, "t": twin, "o": other}, step=1)
        refs = {k: weakref.ref(v) for k, v in (("w", arr), ("t", twin), ("o", other))}
        del arr, twin
        gc.collect()
        assert refs["w"]() is not None and refs["t"]() is not None  # the daemon may still be reading them
        p.wait(30)
        gc.collect()
        # one of that allocation's two, held for the daemon
        assert (refs["w"]() is None) != (refs["t"]() is None)
        c.snapshot({"o": other}, step=2).wait(30)  # the daemon closes the allocation no longer used
        gc.collect()
        assert refs["w"]() is None and refs["t"]() is None
        assert _same(c.restore(1)["w"], np.arange(50_000, dtype=np.float32))
    del other
    gc.collect()
    assert refs["o"]() is None  # bye: the daemon closed the rest
    assert _log_count(d, "fake cuda: closed") == _log_count(d, "fake cuda: opened") == 2


def test_a_state_on_two_devices_is_copied_from_each(fake_gpu, tmp_path, sent) -> None:
    """One process on two GPUs (a pipeline stage each, say): per device a ready event, a copy
    stream, handles; the snapshot is the one a CPU save writes."""
    d = fake_gpu.start("--codec", "shuffle-lz4", devices=2)
    values = _values(5)
    state = {k: fake_gpu.array(v, device=i % 2) for i, (k, v) in enumerate(values.items())}
    with snapd.connect("two", endpoint=d.endpoint, spawn=False) as c:
        info = c.snapshot(state, step=1).wait(30)
        assert set(sent[0]["ready_events"]) == {fake_gpu.uuid(0), fake_gpu.uuid(1)}
        assert c.status()["cuda_devices"] == [fake_gpu.uuid(0), fake_gpu.uuid(1)]
        assert _same(c.restore(), values)
    ref = save_state(tmp_path / "cpu", "two", values, step=1, codec="shuffle-lz4", chunk_bytes=64 << 10)
    assert _chunks(info.path) == _chunks(ref.path)
    assert _log_count(d, "fake cuda: opened") == len(values) - 1  # (not the empty one's)


def test_a_device_state_larger_than_the_host_buffers_grows_them(fake_gpu, tmp_path) -> None:
    """A rank's GPU state is often larger than the default host buffer: the daemon grows the buffer
    it copies into (and pins the new one), and the same layout replays on it step after step."""
    d = fake_gpu.start("--codec", "shuffle-zstd", "--host-buffer-bytes", str(1 << 20))
    rng = np.random.default_rng(11)
    w = fake_gpu.array(rng.standard_normal(3 << 18).astype(np.float32))  # 3 MiB
    state = {"w": w, "h": fake_gpu.array(rng.standard_normal(5000).astype(np.float16)), "step": 0}
    wants = []
    with snapd.connect("big-gpu", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        for step in range(3):
            w.host()[:7] = step
            state["step"] = step
            wants.append(_host(state))
            info = c.snapshot(state, step=step).wait(30)
        [mine] = c.status()["clients"]
        assert mine["last_snapshot"]["bytes"]["cuda_ipc"] == (3 << 20) + 10_000
        assert max(c.status()["buffers"]["sizes"]) > 3 << 20
        for step, want in enumerate(wants):
            assert _same(c.restore(step), want), step
    ref = save_state(tmp_path / "cpu", "big-gpu", wants[-1], step=2, codec="shuffle-zstd",
                     chunk_bytes=64 << 10)
    assert _chunks(info.path) == _chunks(ref.path)
    assert "grown from 1 to" in d.log_text()


def test_two_trainers_share_the_daemon_and_leaving_closes_only_ones_own(fake_gpu) -> None:
    """Two trainers on one node (each its device): their snapshots interleave, each restores its
    own; one leaving closes its handles, and the other's next snapshot still copies."""
    d = fake_gpu.start("--host-buffers", "3", devices=2)
    a = {"w": fake_gpu.array(np.full(20_000, 1.0, np.float32), device=0)}
    b = {"w": fake_gpu.array(np.full(30_000, 2.0, np.float32), device=1), "v": fake_gpu.array(np.arange(9.0))}
    ca = snapd.connect("a", endpoint=d.endpoint, spawn=False)
    with snapd.connect("b", endpoint=d.endpoint, spawn=False) as cb:
        pa, pb = ca.snapshot(a, step=1), cb.snapshot(b, step=1)
        pa.wait(30), pb.wait(30)
        ca.close()
        d.wait_for(lambda: _log_count(d, "fake cuda: closed") == 1)  # a's one handle, not b's two
        b["w"].host()[...] = 3.0
        cb.snapshot(b, step=2).wait(30)
        assert _same(cb.restore(2), {"w": np.full(30_000, 3.0, np.float32), "v": np.arange(9.0)})
        assert _log_count(d, "fake cuda: opened") == 3
    assert _same(snapd.load(d.root, "a"), {"w": np.full(20_000, 1.0, np.float32)})
    d.wait_for(lambda: _log_count(d, "fake cuda: closed") == 3)


def test_two_connections_of_one_process_share_an_allocation(fake_gpu) -> None:
    """The same handle opened for two clients (one process connected twice) is the same mapping
    twice over, as the driver counts it: one client leaving leaves the other's copies working."""
    d = fake_gpu.start()
    arr = fake_gpu.array(np.zeros(10_000, np.float32))
    one = snapd.connect("one", endpoint=d.endpoint, spawn=False)
    with snapd.connect("two", endpoint=d.endpoint, spawn=False) as two:
        one.snapshot({"w": arr}, step=1).wait(30)
        two.snapshot({"w": arr}, step=1).wait(30)
        one.close()
        d.wait_for(lambda: _log_count(d, "fake cuda: closed") == 1)
        arr.host()[...] = 5.0
        two.snapshot({"w": arr}, step=2).wait(30)
        assert _same(two.restore(2), {"w": np.full(10_000, 5.0, np.float32)})
    d.wait_for(lambda: _log_count(d, "fake cuda: closed") == 2)


def test_an_array_the_daemon_cannot_reach_is_staged_here_through_the_driver(fake_gpu, caplog) -> None:
    """A device the daemon does not see: this process stages the array itself, a generic device
    array (no torch, no CuPy here) by a driver copy after its stream, beside arrays that go by IPC."""
    d = fake_gpu.start()  # (one device: device 1 is not the daemon's)
    far = np.random.default_rng(3).standard_normal(12_345)
    near = np.arange(1000, dtype=np.int32)
    with caplog.at_level(logging.WARNING), snapd.connect("far", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot({"far": fake_gpu.array(far, device=1), "near": fake_gpu.array(near)}, step=1).wait(30)
        assert f"the daemon cannot see device {fake_gpu.uuid(1)}" in caplog.text
        [mine] = c.status()["clients"]
        assert mine["last_snapshot"]["bytes"] == {"cuda_ipc": near.nbytes, "registered": 0, "inline": 0,
                                                  "client": far.nbytes}
        assert _same(c.restore(1), {"far": far, "near": near})


def test_staging_memory_that_names_no_context_copies_in_the_devices_primary_one(fake_gpu,
                                                                                monkeypatch) -> None:
    """Memory mapped by the VMM API (PyTorch's expandable_segments) names no context: the staging
    copy and the pinning run in the device's primary context (a NULL one would fail the copy)."""
    from snapd import cuda_driver

    real_alloc, real_copy = cuda_driver.Allocation, cuda_driver.copy_to_host
    monkeypatch.setattr(cuda_driver, "Allocation",
                        lambda ptr: types.SimpleNamespace(**{**vars(real_alloc(ptr)),
                                                                                           "context": 0}))
    monkeypatch.setattr(cuda_driver, "primary_context", lambda ordinal: 500 + ordinal)
    used: list[int] = []
    monkeypatch.setattr(cuda_driver, "copy_to_host", lambda ctx, *a: used.append(ctx) or real_copy(ctx, *a))
    d = fake_gpu.start()
    far = np.arange(3000, dtype=np.float32)
    with snapd.connect("vmm", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot({"far": fake_gpu.array(far, device=1)}, step=1).wait(30)
        assert _same(c.restore(1), {"far": far}) and used == [501]


KILLED_TRAINER = r"""
import sys, time, types
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import fake_cuda
import snapd.client as snapd
arena = fake_cuda.Arena(Path(sys.argv[3]))
fake_cuda.install_client(types.SimpleNamespace(setattr=setattr), [arena])
c = snapd.connect("killed", endpoint=sys.argv[2], spawn=False)
w = fake_cuda.DeviceArray(arena, np.arange(5000, dtype=np.float32))
c.snapshot({"w": w, "v": fake_cuda.DeviceArray(arena, np.ones(10))}, step=1).wait(30)
print("OK", flush=True)
time.sleep(600)
"""


def test_a_trainer_killed_leaves_no_handle_open(fake_gpu, tmp_path) -> None:
    """SIGKILL: no bye. The daemon finds the trainer gone and closes what it opened for it."""
    d = fake_gpu.start()  # (it looks for gone clients every 2 s)
    arena = Path("/dev/shm") / f"snapd-fake-gpu-killed-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER, str(Path(__file__).parent), d.endpoint,
                             str(arena)], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert proc.stdout.readline().strip() == "OK"
        assert _log_count(d, "fake cuda: opened") == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        d.wait_for(lambda: _log_count(d, "fake cuda: closed") == 2)
        assert "is gone; releasing its buffers" in d.log_text()
    finally:
        proc.kill()
        proc.wait()
        arena.unlink(missing_ok=True)
    with snapd.connect("after", endpoint=d.endpoint, spawn=False) as c:  # and serves on
        c.snapshot({"w": fake_gpu.array(np.ones(3))}, step=1).wait(30)


PREEMPTED_TRAINER = r"""
import sys, time, types
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import fake_cuda
import snapd.client as snapd
arena = fake_cuda.Arena(Path(sys.argv[3]))
fake_cuda.install_client(types.SimpleNamespace(setattr=setattr), [arena])
c = snapd.connect("preempted", endpoint=sys.argv[2], spawn=False, keep_last=None)
state = {"w": fake_cuda.DeviceArray(arena, np.zeros(300_000, np.float32)), "step": 0}
c.on_preemption(lambda: (state, state["step"]))
for step in range(1, 4):  # a snapshot every step, then the step that is preempted
    state["w"].host()[...] = step
    state["step"] = step
    if step < 3:
        c.snapshot(state, step=step).wait_copied(30)
print("READY", flush=True)
time.sleep(600)
"""


def test_a_preempted_trainer_on_the_gpu_path_gets_its_latest_state_to_disk(fake_gpu) -> None:
    d = fake_gpu.start("--codec", "shuffle-zstd")
    stderr = fake_gpu.preempt(PREEMPTED_TRAINER, d)
    assert "emergency snapshot of step 3 persisted" in stderr, stderr
    with snapd.connect("preempted", endpoint=d.endpoint, spawn=False) as c:
        c.sync()  # (step 2, handed over before, may still be on its way: the emergency one went first)
    latest = snapd.load(d.root, "preempted")
    assert latest["step"] == 3 and _same(latest["w"], np.full(300_000, 3, np.float32))
    assert [s.step for s in snapd.list_snapshots(d.root, "preempted")] == [1, 2, 3]


def _log_count(d, words: str) -> int:
    text = d.log_text()
    assert "that is not open" not in text, text  # (the stand-in driver's word for a double close)
    return text.count(words)
