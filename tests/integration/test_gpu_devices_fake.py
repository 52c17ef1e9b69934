"""When the daemon takes a device, on the stand-in GPU (fake_cuda.py): with the first snapshot copied
from it, or when a trainer that works on it connects, never before (a daemon no trainer uses on a
GPU holds no memory there), and never one in exclusive-process compute mode (a context of the
daemon's would lock the trainers out of it). Its host buffers are pinned once a device is in use."""

from __future__ import annotations

import numpy as np

import snapd.client as snapd
from snapd.cli import main as cli


def _same(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)


def _paths(c) -> dict:
    """How the client's last snapshot's bytes reached the host buffer (``snapd status``)."""
    [mine] = c.status()["clients"]
    return {k: v for k, v in mine["last_snapshot"]["bytes"].items() if v}


def test_the_daemon_takes_a_device_with_the_first_snapshot_copied_from_it(fake_gpu) -> None:
    """Its context, stream and staging window, and the host buffers' pinning (which needs a
    context): none before, on no device but that one after."""
    d = fake_gpu.start(devices=2)
    with snapd.connect("lazy", endpoint=d.endpoint, spawn=False) as c:
        assert c.status()["cuda_devices_in_use"] == [] and "a context on device" not in d.log_text()
        assert "pinned for device copies" not in d.log_text()
        w = fake_gpu.array(np.arange(1000, dtype=np.float32))
        for step in (1, 2):
            c.snapshot({"w": w}, step=step).wait(30)
        assert c.status()["cuda_devices_in_use"] == [fake_gpu.uuid(0)]
        count = c.status()["buffers"]["count"]
    assert d.log_text().count("fake cuda: a context on device 0") == 1
    assert "a context on device 1" not in d.log_text()
    d.wait_for(lambda: d.log_text().count("pinned for device copies") == count)  # every buffer, once


def test_a_trainer_that_works_on_a_device_has_the_daemon_ready_for_it_from_hello(fake_gpu,
                                                                                 monkeypatch) -> None:
    """connect() names the device torch works on; the daemon makes what a copy from it needs (and pins
    its buffers) then, while the trainer goes on, not in its first snapshot."""
    import torch  # noqa: F401 (connect looks for the device only where torch is loaded)

    from snapd.client import cuda_export

    assert cuda_export.devices_in_use() == []  # (torch here has not initialized CUDA)
    monkeypatch.setattr(cuda_export, "devices_in_use", lambda: [fake_gpu.uuid(1), "GPU-not-a-device-here"])
    d = fake_gpu.start(devices=2)
    with snapd.connect("ready", endpoint=d.endpoint, spawn=False) as c:
        d.wait_for(lambda: c.status()["cuda_devices_in_use"] == [fake_gpu.uuid(1)])  # no snapshot yet
        count = c.status()["buffers"]["count"]
        d.wait_for(lambda: d.log_text().count("pinned for device copies") == count)
    assert "a context on device 0" not in d.log_text()


def test_a_device_in_exclusive_process_mode_is_left_to_the_trainers(fake_gpu, capsys) -> None:
    """A context of the daemon's there would lock the trainers out of their own device."""
    d = fake_gpu.start(devices=2, modes=(0, 3))
    on0, on1 = np.arange(4000, dtype=np.float32), np.linspace(0, 1, 999)
    state = {"a": fake_gpu.array(on0, device=0), "b": fake_gpu.array(on1, device=1)}
    with snapd.connect("exclusive", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(state, step=1).wait(30)
        assert _paths(c) == {"cuda_ipc": on0.nbytes, "client": on1.nbytes}
        st = c.status()
        assert st["counters"]["failed"] == 0  # known from the start: nothing tried, nothing failed
        assert st["cuda_devices"] == st["cuda_devices_in_use"] == [fake_gpu.uuid(0)]
        assert st["cuda_devices_skipped"] == {fake_gpu.uuid(1): "exclusive-process compute mode"}
        assert cli(["status", "--endpoint", d.endpoint]) == 0
    out = capsys.readouterr().out
    assert f"GPU path: {fake_gpu.uuid(0)} (in use), {fake_gpu.uuid(1)} skipped: exclusive-process" in out, out
    assert "a context on device 1" not in d.log_text()
    assert _same(snapd.load(d.root, "exclusive"), {"a": on0, "b": on1})
