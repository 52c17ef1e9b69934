"""The GPU path end to end: a torch (or CuPy) trainer subprocess hands CUDA IPC handles to a real
daemon subprocess; every byte restored equals the byte saved (skipped without CUDA)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd

pytestmark = pytest.mark.gpu
TRAINER = Path(__file__).with_name("gpu_trainer.py")
BIG = str(512 << 20)


def _train(mode: str, d, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(TRAINER), mode, d.endpoint, str(d.root)], capture_output=True,
                       text=True, cwd="/", timeout=300,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert r.returncode == 0 and "OK" in r.stdout, f"{r.stdout}\n{r.stderr}\n--- daemon log\n{d.log_text()}"
    return r


def test_every_dtype_by_ipc_and_back_on_cpu_and_gpu(start) -> None:
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG)
    r = _train("dtypes", d)
    assert "staged by this process" not in r.stderr  # the daemon copied them, by IPC
    assert "GPU path: CUDA IPC" in d.log_text()
    assert json.loads(r.stdout.splitlines()[0])["copied_at_return"] is False  # snapshot() did not wait


def test_gpu_snapshot_loads_where_there_is_no_gpu(start) -> None:
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG)
    _train("dtypes", d)
    code = ("import hashlib, json, sys, numpy as np, snapd.client as s, torch\n"
            "assert not torch.cuda.is_available()\nout = s.load(sys.argv[1], 'dtypes')\ndef walk(t, p=''):\n"
            "    if isinstance(t, dict):\n        for k, v in t.items(): yield from walk(v, p + k + '.')\n"
            "    elif hasattr(t, 'shape'): yield p[:-1], t\ndef raw(t):\n"
            "    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if isinstance(t, "
            "torch.Tensor) else np.ascontiguousarray(t).tobytes()\n"
            "print(json.dumps({k: hashlib.sha256(raw(v)).hexdigest() for k, v in walk(out)}))\n")
    r = subprocess.run([sys.executable, "-c", code, str(d.root)], capture_output=True, text=True, cwd="/",
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((d.root.parent / "expect-dtypes.json").read_text())


def test_mutation_after_fence_does_not_reach_the_snapshot(start) -> None:
    """The trainer changes every tensor right after fence(), without waiting on the CPU: the GPU
    orders the change after the daemon's copy, so the snapshot holds the values from before."""
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG)
    _train("mutate", d)


@pytest.mark.parametrize("codec", ["shuffle-zstd", "raw"])
def test_gpu_path_writes_the_same_bytes_as_the_cpu_path(start, codec) -> None:
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG, "--codec", codec)
    r = _train("identical", d)
    assert f"codec {codec}: identical chunks" in r.stdout


@pytest.mark.parametrize("alloc", ["", "expandable_segments:True"], ids=["ipc", "staged"])
def test_a_training_loop_replays_its_layout_and_every_step_restores(start, alloc) -> None:
    """What a trainer does: snapshot model and AdamW state_dicts every step, guard(optimizer).
    Replayed snapshots name the allocations the first one opened (or, staged, copy from the
    tensors the memo found); a model made anew in freed memory (same addresses, new allocations)
    is restored exactly: by IPC it needs new handles, so it is described anew."""
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG)
    r = _train("loop", d, env={"PYTORCH_CUDA_ALLOC_CONF": alloc} if alloc else None)
    out = json.loads(r.stdout.splitlines()[0])
    paths = out["last_snapshot"]["bytes"]  # as `snapd status` shows them, for step 5
    if alloc:
        assert "not legacy-IPC capable" in r.stderr
        assert paths["cuda_ipc"] == 0 and paths["client"] > 0, paths
    else:
        assert "staged by this process" not in r.stderr and out["flattened"] == 2, r.stdout
        # Adam's step counters
        assert paths["cuda_ipc"] > 0 and paths["client"] == 0 and paths["inline"] > 0, paths


def test_expandable_segments_fall_back_to_staging(start) -> None:
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG)
    r = _train("dtypes", d, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert "not legacy-IPC capable" in r.stderr


def test_daemon_without_cuda_gets_staged_tensors(start) -> None:
    d = start("--backend", "cpu", "--host-buffer-bytes", BIG)
    r = _train("dtypes", d)
    assert "the daemon has no CUDA path" in r.stderr


def test_cupy_arrays_round_trip(start) -> None:
    d = start("--backend", "cuda", "--host-buffer-bytes", BIG)
    _train("cupy", d)


def test_cupy_arrays_are_staged_by_the_driver_for_a_daemon_without_cuda(start) -> None:
    """No IPC: arrays known by __cuda_array_interface__ go by cuMemcpyDtoH after their stream
    (client/cuda_export.py stage), the transposed one made contiguous by CuPy first."""
    d = start("--backend", "cpu", "--host-buffer-bytes", BIG)
    r = _train("cupy", d)
    assert "the daemon has no CUDA path" in r.stderr


@pytest.mark.parametrize("codec", ["shuffle-zstd", "shuffle-lz4", "raw"])
def test_cpu_saved_snapshot_restores_onto_the_gpu(root, codec) -> None:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(1000, 999, generator=g), "bf": torch.randn(12345, generator=g).bfloat16(),
             "i": torch.arange(7), "np": np.arange(5.0)}
    snapd.save(root, "j", state, step=1, codec=codec)
    out = snapd.load(root, "j", device="cuda:0")
    for k in ("w", "bf", "i"):
        assert out[k].device.type == "cuda" and out[k].dtype == state[k].dtype
        assert hashlib.sha256(out[k].cpu().reshape(-1).view(torch.uint8).numpy()).digest() == \
            hashlib.sha256(state[k].reshape(-1).view(torch.uint8).numpy()).digest()
    assert isinstance(out["np"], np.ndarray) and np.array_equal(out["np"], state["np"])
    # resuming in place: contiguous device tensors are unshuffled into on the GPU; a transposed one
    # and a parameter that requires grad are filled from the host
    into = {"w": torch.empty(1000, 999, device="cuda"),
            "bf": torch.empty(12345, dtype=torch.bfloat16, device="cuda"),
            "i": torch.empty(7, dtype=torch.int64, device="cuda")}
    back = snapd.load(root, "j", keys=["w", "bf", "i"], into=into)
    filled = [(k, t, back[k]) for k, t in into.items()]
    for t in (torch.empty(999, 1000, device="cuda").t(),
              torch.nn.Parameter(torch.empty(1000, 999, device="cuda"))):
        filled.append(("w", t, snapd.load(root, "j", keys="w", into={"w": t})["w"]))
    for k, t, returned in filled:
        assert returned is t and t.device.type == "cuda", k
        assert torch.equal(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
                           state[k].reshape(-1).view(torch.uint8)), k


def test_a_restore_where_the_kernel_cannot_run_unshuffles_on_the_host(root, monkeypatch, caplog) -> None:
    """A CuPy that cannot build or load the kernel (its NVRTC missing, say) must not fail a resume:
    the planes are unshuffled on the host and uploaded as they are, once logged."""
    torch = pytest.importorskip("torch")
    import logging

    from snapd.format import to_device
    from snapd.kernels import cupy_backend

    def broken(*args, **kwargs):
        raise RuntimeError("CuPy failed to load libnvrtc.so.12")
    monkeypatch.setattr(cupy_backend, "run_segments", broken)
    monkeypatch.setattr(to_device, "_kernel_failed", [])
    state = {"w": torch.randn(1000, 999), "bf": torch.randn(12345).bfloat16()}
    snapd.save(root, "j", state, step=1, codec="shuffle-zstd")
    into = {"w": torch.empty(1000, 999, device="cuda"),
            "bf": torch.empty(12345, dtype=torch.bfloat16, device="cuda")}
    with caplog.at_level(logging.WARNING):
        snapd.load(root, "j", into=into)
        fresh = snapd.load(root, "j", device="cuda:0")
    for k in state:
        want = state[k].reshape(-1).view(torch.uint8)
        assert torch.equal(into[k].cpu().reshape(-1).view(torch.uint8), want), k
        assert fresh[k].device.type == "cuda" and torch.equal(fresh[k].cpu().reshape(-1).view(torch.uint8),
                                                              want), k
    assert caplog.text.count("the unshuffle kernel cannot run here (RuntimeError: CuPy failed to load") == 1
