"""A daemon that cannot copy a trainer's device tensors, on the stand-in GPU (fake_cuda.py): a
handle that will not open in the daemon, a daemon where none opens (a sandbox or driver without
CUDA IPC), a device copy that fails, a device where the daemon gets no context, a handle the
driver will not export. Each time the snapshot still reaches disk with the values of its step,
staged by the trainer before it changes them, and the later snapshots stage those tensors from
the start instead of failing one by one."""

from __future__ import annotations

import logging

import numpy as np

import snapd.client as snapd
from snapd import cuda_driver


def _state(gpu) -> tuple[dict, dict]:
    """Two device arrays in allocations of their own, and what the snapshot must hold of them."""
    want = {"w": np.linspace(-1, 1, 5000, dtype=np.float32), "b": np.arange(3001, dtype=np.int64)}
    return {k: gpu.array(v) for k, v in want.items()}, want


def _same(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(got[k].dtype == want[k].dtype and got[k].tobytes()
                                         == want[k].tobytes()
                                         for k in want)


def _paths(c) -> dict:
    """How the client's last snapshot's bytes reached the host buffer (``snapd status``)."""
    [mine] = c.status()["clients"]
    return {k: v for k, v in mine["last_snapshot"]["bytes"].items() if v}


def test_an_allocation_whose_handle_will_not_open_is_staged_here_and_the_rest_goes_by_ipc(fake_gpu,
                                                                                          caplog) -> None:
    d = fake_gpu.start()
    state, want = _state(fake_gpu)
    fake_gpu.bad.add(state["w"].allocation)
    with caplog.at_level(logging.WARNING), snapd.connect("bad", endpoint=d.endpoint, spawn=False) as c:
        info = c.snapshot(state, step=1).wait(30)  # failed in the daemon, then handed over again
        assert info.step == 1 and _same(c.restore(1), want)
        assert _paths(c) == {"cuda_ipc": want["b"].nbytes, "client": want["w"].nbytes}
        c.snapshot(state, step=2).wait(30)  # that allocation staged from the start: nothing fails
        assert _paths(c) == {"cuda_ipc": want["b"].nbytes, "client": want["w"].nbytes}
        st = c.status()
        assert st["counters"]["failed"] == 1 and st["buffers"]["busy"] == 0, st  # step 1's first attempt
    assert caplog.text.count("could not open 1 CUDA IPC handle(s) of this process") == 1
    assert "step 1: the daemon could not copy it from the device" in caplog.text
    assert "CUDA_ERROR_INVALID_HANDLE" in d.log_text()
    assert [s.step for s in snapd.list_snapshots(d.root, "bad")] == [1, 2]
    assert _same(snapd.load(d.root, "bad", 2), want)


def test_where_no_handle_opens_the_trainer_stages_the_values_it_held_at_the_fence(fake_gpu, caplog) -> None:
    d = fake_gpu.start(fail="open")
    state, want = _state(fake_gpu)
    with caplog.at_level(logging.WARNING), snapd.connect("noipc", endpoint=d.endpoint, spawn=False) as c:
        p = c.snapshot(state, step=1)
        assert not p.copied  # sent as IPC handles: the daemon finds out on its copy thread
        c.fence()  # what guard(optimizer) does before optimizer.step(): the failure is known by then
        assert p.copied
        state["w"].host()[...] = 7  # the optimizer's step, after the fence
        assert p.wait(30).step == 1
        assert _same(c.restore(1), want)  # the values at snapshot(), not after the step
        p2 = c.snapshot(state, step=2)
        assert p2.copied  # staged in snapshot() itself: IPC is not tried again
        p2.wait(30)
        assert _paths(c) == {"client": sum(v.nbytes for v in want.values())}
        assert c.status()["counters"]["failed"] == 1
    assert "staged by this process, not copied by the daemon: the daemon could not copy them" in caplog.text
    assert "CUDA_ERROR_NOT_SUPPORTED" in caplog.text
    assert snapd.load(d.root, "noipc", 2)["w"].tobytes() == np.full(5000, 7, np.float32).tobytes()


def test_a_device_copy_that_fails_is_staged_here_once_waited_for(fake_gpu) -> None:
    d = fake_gpu.start("--codec", "shuffle-zstd", fail="copy")
    state, want = _state(fake_gpu)
    with snapd.connect("copyfails", endpoint=d.endpoint, spawn=False) as c:
        p = c.snapshot(state, step=1, metrics={"loss": 0.5})
        p.wait_copied(30)
        assert p.copied and p.wait(30).step == 1
        assert c.status()["counters"] == {**c.status()["counters"], "failed": 1, "persisted": 1}
        p2 = c.snapshot(state, step=2)
        assert p2.copied  # staged in snapshot() itself
        p2.wait(30)
    assert "cudaErrorIllegalAddress" in d.log_text()
    [one, two] = snapd.list_snapshots(d.root, "copyfails")
    assert (one.step, one.metrics, two.step) == (1, {"loss": 0.5}, 2)  # handed over again as it was
    assert _same(snapd.load(d.root, "copyfails", 1), want)


def test_a_failing_synchronize_fails_that_snapshot_and_the_gpu_threads_serve_on(fake_gpu) -> None:
    """The device in error: every synchronize fails, on the waiting thread (the copies' marks) and
    on the GPU thread (a leaving client's handles). Each snapshot fails in the copy stage and is
    staged by its trainer; the leaving client's bye is answered; the next client is served."""
    d = fake_gpu.start(fail="sync")
    state, want = _state(fake_gpu)
    for job in ("first", "second"):  # (the second after the first's handles were closed)
        with snapd.connect(job, endpoint=d.endpoint, spawn=False) as c:
            p = c.snapshot(state, step=1)
            p.wait_copied(30)
            assert p.wait(30).step == 1
            st = c.status()
            assert st["in_flight"] == {} and st["buffers"]["busy"] == 0, st
        assert _same(snapd.load(d.root, job), want)
    with snapd.connect("third", endpoint=d.endpoint, spawn=False) as c:
        st = c.status()
    assert st["counters"]["failed"] == 2 and st["counters"]["persisted"] == 2, st
    log = d.log_text()
    assert log.count("failed in copy: GPU copy: cudaErrorIllegalAddress") == 2, log
    assert "synchronize failed" in log and d.proc.poll() is None


def test_an_allocation_the_driver_will_not_export_is_staged_here(fake_gpu, monkeypatch, caplog) -> None:
    d = fake_gpu.start()
    state, want = _state(fake_gpu)
    exported = cuda_driver.mem_handle

    def mem_handle(alloc):
        if alloc.buffer_id == state["b"].allocation:
            raise cuda_driver.CudaError("cuIpcGetMemHandle failed: CUDA_ERROR_INVALID_VALUE")
        return exported(alloc)
    monkeypatch.setattr(cuda_driver, "mem_handle", mem_handle)
    with caplog.at_level(logging.WARNING), snapd.connect("noexport", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(state, step=1).wait(30)
        assert _paths(c) == {"cuda_ipc": want["w"].nbytes, "client": want["b"].nbytes}
        assert c.status()["counters"]["failed"] == 0  # found here, before anything was sent
    assert "an allocation has no CUDA IPC handle here (cuIpcGetMemHandle failed" in caplog.text
    assert _same(snapd.load(d.root, "noexport"), want)


def test_a_device_where_the_daemon_gets_no_context_is_staged_here(fake_gpu) -> None:
    d = fake_gpu.start(fail="context")  # (the trainer filled the device's memory, say)
    state, want = _state(fake_gpu)
    with snapd.connect("nocontext", endpoint=d.endpoint, spawn=False) as c:
        assert c.snapshot(state, step=1).wait(30).step == 1
        assert _paths(c) == {"client": sum(v.nbytes for v in want.values())}
        p2 = c.snapshot(state, step=2)
        assert p2.copied  # staged in snapshot() itself
        p2.wait(30)
        assert c.status()["cuda_devices_in_use"] == []
    assert "the daemon cannot have its context and staging window" in d.log_text()
    assert "CUDA_ERROR_OUT_OF_MEMORY" in d.log_text()
    assert _same(snapd.load(d.root, "nocontext", 1), want)


PREEMPTED_FIRST = r"""
import sys, time, types
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import fake_cuda
import snapd.client as snapd
arena = fake_cuda.Arena(Path(sys.argv[3]))
fake_cuda.install_client(types.SimpleNamespace(setattr=setattr), [arena])
c = snapd.connect("preempted", endpoint=sys.argv[2], spawn=False)
state = {"w": fake_cuda.DeviceArray(arena, np.full(300_000, 5, np.float32)), "step": 5}
c.on_preemption(lambda: (state, state["step"]))
print("READY", flush=True)
time.sleep(600)
"""


def test_a_preempted_trainer_whose_daemon_has_no_ipc_gets_its_first_snapshot_to_disk(fake_gpu) -> None:
    """The emergency snapshot is the job's first: the daemon's failure to open the handle comes
    while the signal handler waits for it, and the trainer stages the state there and then."""
    d = fake_gpu.start(fail="open")
    stderr = fake_gpu.preempt(PREEMPTED_FIRST, d)
    assert "emergency snapshot of step 5 persisted" in stderr, stderr
    latest = snapd.load(d.root, "preempted")
    assert latest["step"] == 5 and latest["w"].tobytes() == np.full(300_000, 5, np.float32).tobytes()
