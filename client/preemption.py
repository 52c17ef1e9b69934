"""Emergency snapshots on preemption (SIGTERM from Kubernetes or Slurm, SIGUSR1
from Slurm's ``--signal``).

On the signal: snapshot ``state_fn()`` marked emergency (the daemon takes it
ahead of queued work with its fastest codec), wait until it is persisted or
the deadline passes (under the 30 s that Slurm's KillWait and Kubernetes'
grace period give by default), then hand the signal on: to the handler that
was installed before, or to the default action.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol


class Client(Protocol):
    """What the handler needs of snapd.client.daemon.Client."""

    def snapshot(self, state: Any, *, step: int, metrics: dict | None = None,
                 emergency: bool = False) -> Any: ...

log = logging.getLogger(__name__)


def install(client: Client, state_fn: Callable[[], tuple[Any, int]], signals: tuple | None = None,
            deadline_s: float = 25.0, requeue: bool | None = None) -> None:
    """Install the handler; ``state_fn()`` returns ``(state, step)`` at signal time. ``requeue``
    (default: under Slurm): after SIGUSR1's snapshot, ``scontrol requeue`` the job, as Lightning
    does at the time limit's warning (``--signal=USR1@N``): the job comes back and resumes."""
    signals = tuple(signals or (signal.SIGTERM, signal.SIGUSR1))
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if requeue is None:
        requeue = slurm_job is not None
    if slurm_job is not None:
        log.info("Slurm job %s, restart %s", slurm_job, os.environ.get("SLURM_RESTART_COUNT", "0"))
    previous: dict[int, Any] = {}
    busy: dict[str, Any] = {"dumping": False, "step": None}

    def handler(signum: int, frame: FrameType | None) -> None:
        if busy["dumping"]:  # a second signal during the dump: the dump goes on
            return
        busy["dumping"] = True
        t0 = time.monotonic()
        name = signal.Signals(signum).name
        try:
            if signum == signal.SIGUSR1 and slurm_job is not None:  # (--signal=USR1@N: the time limit's
                left = _time_left(slurm_job)                        # warning; the daemon hears it too)
                if left is not None:
                    busy["left"] = left
                    client._grace_s = left  # type: ignore[attr-defined]
            state, step = state_fn()
            if step == busy["step"]:  # (SIGTERM after SIGUSR1's dump of the same step: it is on disk)
                log.warning("%s: step %d's emergency snapshot is the daemon's already", name, step)
            else:
                client._until = t0 + deadline_s  # type: ignore[attr-defined]  # (the hand-over's waits too)
                _dump(client, name, state, step, t0, deadline_s, busy.pop("left", None))
                busy["step"] = step
        except Exception as e:  # the signal must still be handed on, whatever happened
            log.error("%s: emergency snapshot failed after %.2f s: %s", name, time.monotonic() - t0, e)
        finally:
            busy["dumping"] = False
            client._grace_s = None  # type: ignore[attr-defined]  # (used by this dump's snapshot, or by none)
            client._until = None  # type: ignore[attr-defined]
        if requeue and signum == signal.SIGUSR1 and slurm_job is not None:
            _requeue(slurm_job)
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for s in signals:
        previous[s] = signal.signal(s, handler)


def _dump(client: Client, name: str, state: Any, step: int, t0: float, deadline_s: float,
          left: float | None) -> None:
    """The emergency snapshot, waited for until ``deadline_s`` after ``t0``; raised if not handed over
    by then (the daemon holding it, not yet persisted, is enough)."""
    pending = client.snapshot(state, step=step, emergency=True)
    try:
        done = pending.wait(timeout=max(0.1, deadline_s - (time.monotonic() - t0)))
    except TimeoutError:
        if not pending.copied:
            raise
        # (a slow disk: the state is the daemon's, which persists it once this process is gone, and
        # drains it at its own SIGTERM; a resumed job's restore waits for it)
        log.warning("%s: emergency snapshot of step %d handed to the daemon, not yet persisted after "
                    "%.2f s: the daemon persists it", name, step, time.monotonic() - t0)
        return
    took = time.monotonic() - t0
    log.warning("%s: emergency snapshot of step %d persisted in %.2f s at %s", name, step, took, done.path)
    if left is not None and took > left:
        log.error("%s: the emergency snapshot took %.2f s, but the job's time limit was %.1f s away: "
                  "--signal is too short for this state (give it at least %.0f s: docs/clusters.md)", name,
                  took, left, max(60.0, 3 * took))


def _requeue(job_id: str) -> None:
    """Put the Slurm job back in the queue (it must have been submitted with ``--requeue``)."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job_id, e)
        return
    if out.returncode:
        log.error("scontrol requeue %s: %s (was the job submitted with --requeue?)", job_id,
                  out.stderr.strip() or out.returncode)
    else:
        log.warning("Slurm job %s requeued: it resumes from the emergency snapshot", job_id)


def _time_left(job_id: str) -> float | None:
    """Seconds until the Slurm job's time limit (its end time, as squeue says it), if known."""
    import subprocess
    from datetime import datetime

    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=3).stdout.strip()  # (out of the dump's time: a slow answer is none)
        return max(0.0, datetime.fromisoformat(out).timestamp() - time.time())
    except (OSError, ValueError, subprocess.TimeoutExpired):  # no squeue, no limit ("Unknown")
        return None
