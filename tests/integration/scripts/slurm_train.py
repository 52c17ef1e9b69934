"""``python slurm_train.py ENDPOINT JOB STEPS EVERY``: a training loop as a Slurm batch job runs it.

Its state at step s is ``weights(s)`` (1 MiB, a function of the step alone, so a resumed run can be
checked bit for bit); it snapshots every EVERY steps, resumes from the latest snapshot when there
is one, and takes an emergency snapshot on SIGTERM/SIGUSR1 (``on_preemption``). Prints ``RESTART n PID p``
(Slurm's restart count), ``RESUMED step digest expected-digest``, ``STEP s`` and ``DONE``; the
emergency snapshot's log line goes to stderr.
"""

import hashlib
import logging
import os
import sys
import time

import numpy as np

import snapd.client as snapd

endpoint, job, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def weights(step: int) -> np.ndarray:
    return np.random.default_rng(step).standard_normal(1 << 18).astype(np.float32)


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


client = snapd.connect(job, endpoint=endpoint, spawn=False, keep_last=3)
say(f"RESTART {os.environ.get('SLURM_RESTART_COUNT', '0')} PID {os.getpid()}")
current = (0, np.zeros(1 << 18, np.float32))  # (step, weights), swapped in one assignment
if client.list():
    back = client.restore("latest")
    current = (back["step"], back["w"])
    say(f"RESUMED {back['step']} {digest(back['w'])} {digest(weights(back['step']))}")
client.on_preemption(lambda: ({"w": current[1], "step": current[0]}, current[0]))
while current[0] < steps:
    step = current[0] + 1
    current = (step, weights(step))
    if step % every == 0:
        client.snapshot({"w": current[1], "step": step}, step=step)
    say(f"STEP {step}")
    time.sleep(0.1)
say("DONE")
client.close()
