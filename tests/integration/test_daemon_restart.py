"""A trainer's client when its daemon dies and another is started on the endpoint (as systemd's
Restart= does): what the dead one had taken fails at once, the client joins the new one by itself,
sync says what was lost, and no client joins a daemon behind another user's socket."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.client.connection import SessionLost, daemon_status
from snapd.errors import DaemonUnavailable, PermissionDenied


def _killed_after_step_1(start):
    """A daemon and a client of job "gone" with step 1 committed; the daemon then SIGKILLed."""
    d = start()
    c = snapd.connect("gone", endpoint=d.endpoint, spawn=False)
    c.snapshot({"w": np.ones(3)}, step=1).wait(30)
    d.proc.kill()
    d.proc.wait()
    return d, c


def test_a_daemon_dying_fails_what_it_took_at_once_and_the_client_joins_the_next(start, caplog) -> None:
    """A daemon killed holding a request (stopped first, so the request waits in its socket): the
    waiting caller hears DaemonUnavailable when the connection closes, not after its 60 s timeout.
    The same client then snapshots through the daemon started on the endpoint (as systemd's
    Restart= does): it says hello again, and its shared (registered) tensors are registered anew."""
    d = start()
    c = snapd.connect("gone", endpoint=d.endpoint, spawn=False, timeout_s=60.0)
    shared = {"p": torch.arange(50_000, dtype=torch.float32)}
    c.share(shared)
    c.snapshot({"w": np.ones(3), "m": shared}, step=1).wait(30)
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            c.sync()
            outcome.append(None)
        except BaseException as e:  # (the test reads it)
            outcome.append(e)

    os.kill(d.proc.pid, signal.SIGSTOP)
    waiter = threading.Thread(target=ask)
    waiter.start()
    time.sleep(0.5)  # (the request is in the stopped daemon's socket)
    d.proc.kill()
    d.proc.wait()
    waiter.join(20)  # (well inside the 60 s a silent daemon is given)
    assert not waiter.is_alive(), "the caller still waits on a daemon that is gone"
    assert isinstance(outcome[0], DaemonUnavailable) and "closed the connection before answering" in \
        str(outcome[0]), outcome
    d2 = start(endpoint=d.endpoint, root=d.root, name="d2")
    shared["p"].mul_(3.0)
    c.snapshot({"w": np.full(3, 2.0), "m": shared}, step=2).wait(30)
    back = c.restore(2)
    assert np.array_equal(back["w"], np.full(3, 2.0)) and torch.equal(back["m"]["p"], shared["p"])
    assert np.array_equal(c.restore(1)["w"], np.ones(3))  # (the resume point before the crash)
    assert "this client joined it again" in caplog.text
    assert f"client pid {os.getpid()} registered" in d2.log_text()  # (the shared tensors, anew)
    c.close()
    assert [s.step for s in snapd.list_snapshots(d.root, "gone")] == [1, 2]


def test_sync_across_a_restart_says_what_was_lost_once_and_restore_goes_on(start) -> None:
    """sync promises the snapshots in flight are persisted: across a daemon restart it cannot, and
    says so once (the client joins the new daemon meanwhile); restore and list read what was
    committed, whether or not a sync came first."""
    d, c = _killed_after_step_1(start)
    d2 = start(endpoint=d.endpoint, root=d.root, name="d2")
    with pytest.raises(SessionLost, match="not persisted are lost"):
        c.sync()
    c.sync()  # (joined: the new daemon knows this client)
    assert np.array_equal(c.restore("latest")["w"], np.ones(3))
    d2.proc.kill()
    d2.proc.wait()
    start(endpoint=d.endpoint, root=d.root, name="d3")
    assert [s.step for s in c.list()] == [1]  # (its sync said what was lost, in the log)
    assert np.array_equal(c.restore("latest")["w"], np.ones(3))
    c.snapshot({"w": np.full(3, 4.0)}, step=2).wait(30)
    assert [s.step for s in c.list()] == [1, 2]
    c.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_client_joins_no_daemon_whose_socket_another_user_owns(start) -> None:
    """Whoever owns the endpoint's socket after a restart gets the client's tensors: a socket of
    another user there is refused as at connect, and no hello goes to it."""
    d, c = _killed_after_step_1(start)
    d2 = start(endpoint=d.endpoint, root=d.root, name="d2")
    os.chown(d.endpoint.removeprefix("ipc://"), 65534, 65534)  # (as if another user had put it there)
    with pytest.raises(PermissionDenied, match="belongs to uid 65534"):
        c.snapshot({"w": np.full(3, 2.0)}, step=2)
    os.chown(d.endpoint.removeprefix("ipc://"), 0, 0)  # (to ask the daemon who it serves)
    assert not [x for x in daemon_status(d2.endpoint)["clients"] if x["pid"] == os.getpid()]
    c.close()
    assert [s.step for s in snapd.list_snapshots(d.root, "gone")] == [1]
