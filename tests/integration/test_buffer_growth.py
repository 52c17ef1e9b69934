"""A snapshot larger than the daemon's host buffers: the buffer it is granted grows (up to
max_host_buffer_bytes), the snapshot lands whole, and the snapshots after it reuse the grown
buffers. Past the bound: a clear error, the daemon goes on, and nothing on disk is lost."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.client.connection import Connection, daemon_status
from snapd.errors import Busy, LimitExceeded, SnapdError

MIB = 1 << 20


def _state(seed: int, floats: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(floats, dtype=np.float32), "b": rng.standard_normal(77), "step": seed}


def _same(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(
        got[k].tobytes() == want[k].tobytes() and got[k].dtype == want[k].dtype
        if isinstance(want[k], np.ndarray)
        else got[k] == want[k] for k in want)


def test_a_snapshot_larger_than_the_buffers_grows_them_and_restores_exactly(start) -> None:
    d = start("--host-buffer-bytes", str(MIB), "--max-host-memory-bytes", str(128 * MIB))  # room for 2 grown
    wants = [_state(step, 3 * MIB // 4 + step) for step in range(5)]  # 3 MiB each, over the 1 MiB buffers
    with snapd.connect("grow", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        assert c.snapshot(wants[0], step=0).wait(30).step == 0
        # no waiting between
        pendings = [c.snapshot(want, step=step) for step, want in enumerate(wants) if step]
        assert [p.wait(30).step for p in pendings] == [1, 2, 3, 4]
        buffers = c.status()["buffers"]
        for step, want in enumerate(wants):
            assert _same(c.restore(step), want), step
    assert buffers["bytes_each"] == MIB and buffers["count"] == 2
    grown = [size for size in buffers["sizes"] if size > MIB]
    assert grown and all(3 * MIB < size <= buffers["max_bytes_each"] for size in grown)
    assert d.log_text().count("grown from 1 to") == len(grown), d.log_text()  # once a buffer, not a snapshot


def test_the_whole_double_buffer_grows_so_a_snapshot_during_a_flush_does_not_wait_for_a_buffer(start) -> None:
    """After the first large snapshot the other starting buffer grows ahead: the next one (an
    emergency snapshot at preemption, while the first is still being written) finds it ready."""
    d = start("--host-buffer-bytes", str(MIB))
    want = _state(3, MIB)  # 4 MiB
    with snapd.connect("double", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot(want, step=1).wait(30)
        deadline = time.monotonic() + 20
        while min(daemon_status(d.endpoint)["buffers"]["sizes"]) < 4 * MIB and time.monotonic() < deadline:
            time.sleep(0.02)
        buffers = daemon_status(d.endpoint)["buffers"]
        assert buffers["count"] == 2 and min(buffers["sizes"]) >= 4 * MIB, buffers
        c.snapshot(want, step=2, emergency=True).wait(30)
        assert _same(c.restore(2), want)
    assert "host buffer 1 grows ahead" in d.log_text()
    assert d.log_text().count("grown from 1 to") == 1  # (the first; nothing was made for the second)


def test_sigterm_during_the_first_flush_of_a_grown_state_persists_the_emergency_snapshot(start,
                                                                                         client_proc) -> None:
    """A state larger than the buffers, preempted right after its first snapshot: the emergency
    snapshot needs the other buffer of the double buffer, grown (ahead, or for it) while the first
    is still being written. Both land, the emergency one with the values at the signal."""
    d = start("--host-buffer-bytes", str(MIB), "--codec", "shuffle-zstd", "--encode-threads", "1")
    code = ("import os, signal, sys, numpy as np, snapd.client as c\n"
            "cl = c.connect('preempt-grown', endpoint=sys.argv[1], spawn=False, keep_last=None)\n"
            "state = {'w': np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32), 'step': 1}\n"
            "cl.on_preemption(lambda: (state, state['step']), deadline_s=60)\n"
            "cl.snapshot(state, step=1)  # 16 MiB: not waited for\nstate['w'] += 1; state['step'] = 2\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nprint('not terminated')\n")
    out = client_proc(code, d.endpoint)
    assert out.returncode == -signal.SIGTERM, out.stdout + out.stderr
    infos = snapd.list_snapshots(d.root, "preempt-grown")
    assert [(i.step, i.emergency) for i in infos] == [(1, False), (2, True)], d.log_text()
    want = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)
    assert snapd.load(d.root, "preempt-grown", step=1)["w"].tobytes() == want.tobytes()
    assert snapd.load(d.root, "preempt-grown", step=2)["w"].tobytes() == (want + 1).tobytes()


def test_a_job_that_resumes_finds_buffers_sized_for_its_last_snapshot(start) -> None:
    """A preempted job restarts: when it connects, the daemon grows its buffers to its last
    snapshot's size (the job's index says it), before the first snapshot asks."""
    d = start("--host-buffer-bytes", str(MIB), env={"SNAPD_CLIENT_CHECK_INTERVAL_S": "0.2"})
    want = _state(5, MIB)  # 4 MiB

    def sizes_reach(test, what: str) -> list[int]:
        deadline = time.monotonic() + 20
        while not test(sizes := daemon_status(d.endpoint)["buffers"]["sizes"]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert test(sizes), (what, sizes)
        return sizes
    with snapd.connect("resumes", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(want, step=1).wait(30)
    sizes_reach(lambda s: s == [MIB, MIB], "the job ended: back to the starting buffers")
    with snapd.connect("resumes", endpoint=d.endpoint, spawn=False) as c:
        sizes_reach(lambda s: len(s) == 2 and min(s) >= 4 * MIB, "grown for the job on its hello")
        assert _same(c.restore(), want)
        c.snapshot(want, step=2).wait(30)
    assert "whose last snapshot was 4 MiB" in d.log_text()
    assert d.log_text().count("grown from 1 to") == 1  # the first run's first snapshot only


def test_past_max_host_buffer_bytes_a_snapshot_is_refused_and_the_daemon_goes_on(start, tmp_path) -> None:
    d = start("--host-buffer-bytes", str(MIB), "--max-host-buffer-bytes", str(2 * MIB))
    small, fits, big = _state(1, MIB // 8), _state(2, 3 * MIB // 8), _state(3, MIB)
    with snapd.connect("cap", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        c.snapshot(small, step=1).wait(30)
        c.snapshot(fits, step=2).wait(30)  # 1.5 MiB: grown to the bound, 2 MiB, not the usual 64 MiB step
        with pytest.raises(SnapdError, match="max_host_buffer_bytes"):
            c.snapshot(big, step=3).wait(30)
        c.snapshot(small, step=4).wait(30)
        assert _same(c.restore(1), small) and _same(c.restore(2), fits) and _same(c.restore(4), small)
        assert [s.step for s in c.list()] == [1, 2, 4]
        assert max(c.status()["buffers"]["sizes"]) == 2 * MIB
    assert d.proc.poll() is None


def test_registered_tensors_larger_than_the_buffers_grow_them(start) -> None:
    """The lease-free path: the daemon copies every tensor from the client's shared regions, so the
    buffer is granted (and grown) on the daemon's side for the snapshot as the layout places it."""
    d = start("--host-buffer-bytes", str(MIB))
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 768)  # 3 MiB of weights
    with snapd.connect("reg-grow", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        c.share(model)
        for step in range(3):
            with torch.no_grad():
                model.weight.add_(1.0)
            want = {k: v.clone() for k, v in model.state_dict().items()}
            c.snapshot(model.state_dict(), step=step).wait(30)
            got = c.restore(step)
            assert all(torch.equal(got[k], want[k]) for k in want), step
        assert c.status()["clients"][0]["last_snapshot"]["bytes"]["registered"] == 4 * (1024 * 768 + 768)


def test_a_waiting_snapshot_is_granted_a_grown_buffer_when_one_frees(start) -> None:
    """Both buffers held by another client: the large snapshot waits, and gets a buffer grown for it
    as soon as one is given back (max_host_memory_bytes leaves room to grow one, not to add one)."""
    d = start("--host-buffer-bytes", str(MIB), "--max-host-buffer-bytes", str(32 * MIB),
              "--max-host-memory-bytes", str(33 * MIB))
    holder = Connection(d.endpoint, 10)
    try:
        holder.call("hello", job="holder", pid=os.getpid(), on_busy="wait")
        leases = [holder.call("acquire", nbytes=100, emergency=False)["lease"] for _ in range(2)]
        want = _state(7, MIB)  # 4 MiB
        with snapd.connect("waits", endpoint=d.endpoint, spawn=False) as c:
            done: list = []
            t = threading.Thread(target=lambda: done.append(c.snapshot(want, step=7).wait(30)))
            t.start()
            t.join(1.0)
            assert not done and daemon_status(d.endpoint)["waiting_for_buffer"] == 1
            holder.call("release", lease=leases[0])
            t.join(30)
            assert done and done[0].step == 7
            assert _same(c.restore(7), want)
        holder.call("release", lease=leases[1])
    finally:
        holder.close()


def test_client_buffer_bytes_counts_a_grown_buffer_at_its_size(start) -> None:
    """A client limited to 2 MiB of buffers that holds one grown for a 3 MiB snapshot is at its limit
    (counted in buffers of the starting size it would hold only one of two); others go on."""
    d = start("--host-buffer-bytes", str(MIB), "--host-buffers", "3",
              env={"SNAPD_CLIENT_BUFFER_BYTES": str(2 * MIB)})
    a, b = Connection(d.endpoint, 10), Connection(d.endpoint, 10)
    try:
        a.call("hello", job="lim", pid=os.getpid(), on_busy="skip")
        b.call("hello", job="other", pid=os.getpid(), on_busy="skip")
        with pytest.raises(Busy, match="being made ready"):  # a skipping client does not wait for it
            a.call("acquire", nbytes=3 * MIB, emergency=False)
        deadline = time.monotonic() + 20
        while max(daemon_status(d.endpoint)["buffers"]["sizes"]) < 3 * MIB and time.monotonic() < deadline:
            time.sleep(0.02)
        big = a.call("acquire", nbytes=3 * MIB, emergency=False)  # a later snapshot gets it
        assert big["bytes"] >= 3 * MIB
        with pytest.raises(Busy, match="client_buffer_bytes"):
            a.call("acquire", nbytes=100, emergency=False)
        small = b.call("acquire", nbytes=100, emergency=False)
        a.call("release", lease=big["lease"])
        again = a.call("acquire", nbytes=100, emergency=False)  # under its limit once the big one is back
        assert again["lease"] != big["lease"]
        for conn, grant in ((a, again), (b, small)):
            conn.call("release", lease=grant["lease"])
    finally:
        a.close()
        b.close()


def test_a_buffer_larger_than_memory_allows_is_refused_naming_why(start) -> None:
    """max_host_buffer_bytes set past what the machine has: the growth is refused before any page is
    touched (a touch past tmpfs's end is a SIGBUS in whoever made it), and the daemon goes on."""
    d = start("--host-buffer-bytes", str(MIB), "--max-host-buffer-bytes", str(1 << 50),
              "--max-host-memory-bytes", str(1 << 51))
    with snapd.connect("huge", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        conn = Connection(d.endpoint, 10)
        try:
            conn.call("hello", job="huge", pid=os.getpid(), on_busy="wait")
            with pytest.raises(LimitExceeded,
                               match=r"grown from 1048576 to \d+ bytes, but .*(free|available)"):
                conn.call("acquire", nbytes=1 << 49, emergency=False)
        finally:
            conn.close()
        want = _state(9, MIB // 8)
        c.snapshot(want, step=9).wait(30)
        assert _same(c.restore(9), want)
        assert daemon_status(d.endpoint)["buffers"]["sizes"] == [MIB, MIB]


def test_clients_snapshotting_at_once_get_more_buffers_and_a_finished_job_gives_them_back(start) -> None:
    """Eight ranks of a node snapshot at the same step into one daemon: a request that finds every
    buffer busy gets one more (within max_host_memory_bytes) instead of waiting for a flush. Once
    no client is left, the added and grown buffers go: a service keeps no finished job's memory."""
    d = start("--host-buffer-bytes", str(MIB), env={"SNAPD_CLIENT_CHECK_INTERVAL_S": "0.2"})
    a, b = Connection(d.endpoint, 10), Connection(d.endpoint, 10)
    try:
        a.call("hello", job="rank0", pid=os.getpid(), on_busy="wait")
        b.call("hello", job="rank1", pid=os.getpid(), on_busy="wait")
        held = [a.call("acquire", nbytes=100, emergency=False) for _ in range(2)]  # both, never given back
        third = b.call("acquire", nbytes=3 * MIB, emergency=False)  # would wait forever without a third
        assert third["buffer"] not in {g["buffer"] for g in held} and third["bytes"] >= 3 * MIB
        st = daemon_status(d.endpoint)["buffers"]
        assert st["count"] == 3 and st["busy"] == 3 and st["max_bytes"] >= sum(st["sizes"])
        b.call("release", lease=third["lease"])
        want = _state(4, MIB // 2)  # 2 MiB: a free buffer grows for it rather than another being added
        with snapd.connect("rank1", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
            c.snapshot(want, step=4).wait(30)
            assert _same(c.restore(4), want)
            assert daemon_status(d.endpoint)["buffers"]["count"] == 3
        for g in held:
            a.call("release", lease=g["lease"])
    finally:
        a.call("bye")
        b.call("bye")
        a.close()
        b.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = daemon_status(d.endpoint)["buffers"]
        if st["sizes"] == [MIB, MIB]:
            break
        time.sleep(0.1)
    assert st["sizes"] == [MIB, MIB] and st["count"] == 2, st
    assert "added: more snapshots at once than buffers" in d.log_text()
    with snapd.connect("next-job", endpoint=d.endpoint, spawn=False) as c:  # the pool serves on as at start
        c.snapshot(_state(5, 1000), step=5).wait(30)


def test_with_no_memory_left_for_another_buffer_a_request_waits_or_is_skipped(start) -> None:
    d = start("--host-buffer-bytes", str(MIB), "--max-host-memory-bytes", str(2 * MIB))
    a, b = Connection(d.endpoint, 10), Connection(d.endpoint, 10)
    try:
        a.call("hello", job="rank0", pid=os.getpid(), on_busy="wait")
        b.call("hello", job="rank1", pid=os.getpid(), on_busy="skip")
        held = [a.call("acquire", nbytes=100, emergency=False) for _ in range(2)]
        with pytest.raises(Busy, match="max_host_memory_bytes"):
            b.call("acquire", nbytes=100, emergency=False)
        waiting = a.send("acquire", nbytes=100, emergency=False)
        with pytest.raises(TimeoutError):
            a.wait(waiting, 0.5)
        a.call("release", lease=held[0]["lease"])
        assert a.wait(waiting, 10)["buffer"] == held[0]["buffer"]
        assert daemon_status(d.endpoint)["buffers"]["count"] == 2
        assert d.log_text().count("no room for another of 1 MiB (max_host_memory_bytes (2097152))") == 1
    finally:
        a.close()
        b.close()
