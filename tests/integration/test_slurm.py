"""A real Slurm (Debian's slurmctld, slurmd, munge: tests/slurm_cluster.py, one node on localhost)
preempts and requeues a training job that snapshots through a snapd daemon on the node (issue 28):
the requeued run resumes from the emergency snapshot taken at Slurm's SIGTERM, bit for bit; a job
killed without grace resumes from its latest regular snapshot. Skipped where Slurm is not
installed or not root (`.ci/run` installs it)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from snapd.client.connection import daemon_status


def _load_cluster():  # (tests/ is not a package: --import-mode=importlib)
    spec = importlib.util.spec_from_file_location("slurm_cluster",
                                                  Path(__file__).parent.parent / "slurm_cluster.py")
    module = sys.modules["slurm_cluster"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cluster = _load_cluster()
SlurmCluster, available = _cluster.SlurmCluster, _cluster.available
TRAIN = Path(__file__).parent / "scripts" / "slurm_train.py"
pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "Slurm here")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), kill_wait_s=20)
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, tmp: Path, endpoint: str, job: str, steps: int,
           every: int) -> tuple[str, Path]:
    script = tmp / f"{job}.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\n"
                      f"#SBATCH --output={tmp}/{job}-%j.out\n"
                      f"exec {sys.executable} {TRAIN} {endpoint} {job} {steps} {every}\n")
    job_id = slurm.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    return job_id, tmp / f"{job}-{job_id}.out"


def wait_for(cond, what: str, slurm: SlurmCluster, out: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what}:\n{out.read_text() if out.exists() else ''}\n" \
                                            f"{slurm.logs()}"
        time.sleep(0.2)


def steps_done(out: Path) -> int:
    found = re.findall(r"^STEP (\d+)$", out.read_text(), re.M) if out.exists() else []
    return int(found[-1]) if found else 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scontrol_requeue_resumes_from_the_emergency_snapshot_taken_at_sigterm(slurm, daemon, tmp_path):
    job_id, out = submit(slurm, tmp_path, daemon.endpoint, "pre", 100000, 10)
    try:
        wait_for(lambda: steps_done(out) >= 23, "training", slurm, out)
        before = steps_done(out)  # (the latest regular snapshot is at most step before // 10 * 10)
        slurm.run("scontrol", "requeue", job_id)  # Slurm: SIGTERM, KillWait, SIGKILL, then pending again
        wait_for(lambda: "RESUMED" in out.read_text(), "requeued run", slurm, out)
        text = out.read_text()
        [dumped] = re.findall(r"SIGTERM: emergency snapshot of step (\d+) persisted", text)
        resumed = re.search(r"RESUMED (\d+) (\w+) (\w+)", text)
        assert resumed and resumed.group(1) == dumped, text  # the step at the signal, not the last regular
        assert int(dumped) >= before, (dumped, before)       # one (a multiple of 10 below ``before``)
        assert resumed.group(2) == resumed.group(3), text  # its tensors bit for bit
        assert "RESTART 1" in text and slurm.job(job_id)["Restarts"] == "1"
        # how long the emergency snapshot took, for sizing the grace (docs/clusters.md)
        [job] = [j for j in daemon_status(daemon.endpoint)["jobs"] if j["job"] == "pre"]
        assert job["last_emergency_s"] is not None and job["last_emergency_s"] > 0, job
    finally:
        slurm.run("scancel", job_id, check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_killed_without_grace_resumes_from_its_latest_regular_snapshot(slurm, daemon, tmp_path):
    job_id, out = submit(slurm, tmp_path, daemon.endpoint, "kill", 100000, 10)
    try:
        wait_for(lambda: steps_done(out) >= 25, "training", slurm, out)
        pid = int(re.search(r"RESTART 0 PID (\d+)", out.read_text()).group(1))
        os.kill(pid, signal.SIGKILL)  # no grace (the OOM killer, a node's crash): Slurm sees the job fail
        wait_for(lambda: slurm.job(job_id)["JobState"] not in ("RUNNING", "COMPLETING"), "the job's end",
                 slurm, out)
        last = steps_done(out)
        slurm.run("scontrol", "requeue", job_id)
        wait_for(lambda: "RESUMED" in out.read_text(), "requeued run", slurm, out)
        resumed = re.search(r"RESUMED (\d+) (\w+) (\w+)", out.read_text())
        assert resumed is not None and resumed.group(2) == resumed.group(3), out.read_text()
        step = int(resumed.group(1))
        assert step % 10 == 0 and last - 10 < step <= last, (step, last)  # the last snapshot handed over
        assert "emergency snapshot" not in out.read_text()
    finally:
        slurm.run("scancel", job_id, check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_time_limit_warning_snapshots_and_requeues_the_job_itself(slurm, daemon, tmp_path):
    # what --signal=USR1@N sends before the time limit (here at once, to the job's process)
    job_id, out = submit(slurm, tmp_path, daemon.endpoint, "usr1", 100000, 10)
    try:
        wait_for(lambda: steps_done(out) >= 13, "training", slurm, out)
        before = steps_done(out)
        slurm.run("scancel", "--batch", "--signal=USR1", job_id)
        wait_for(lambda: "RESUMED" in out.read_text(), "requeued run", slurm, out)
        text = out.read_text()
        assert "SIGUSR1: emergency snapshot of step" in text and f"Slurm job {job_id} requeued" in text, text
        [dumped] = re.findall(r"SIGUSR1: emergency snapshot of step (\d+) persisted", text)
        resumed = re.search(r"RESUMED (\d+) (\w+) (\w+)", text)
        assert resumed and resumed.group(1) == dumped and int(dumped) >= before, text
        assert resumed.group(2) == resumed.group(3) and "RESTART 1" in text, text
    finally:
        slurm.run("scancel", job_id, check=False)


@pytest.fixture(scope="module", autouse=True)
def late_job(slurm, module_daemon, tmp_path_factory):
    """The job of the too-short test below, submitted as the module starts: Slurm's smallest time
    limit is one minute, so the job must have run a minute before a limit can lie in the past. The
    module's other tests run meanwhile (the partition runs jobs side by side: OverSubscribe)."""
    job_id, out = submit(slurm, tmp_path_factory.mktemp("late"), module_daemon.endpoint, "late", 100000, 10)
    yield job_id, out, module_daemon
    slurm.run("scancel", job_id, check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_signal_that_leaves_too_little_time_for_the_state_is_said_so(slurm, late_job):
    job_id, out, daemon = late_job
    wait_for(lambda: steps_done(out) >= 1, "training", slurm, out)
    # a minute after the job started, its time limit moved to 1 minute (Slurm's smallest): it has
    # passed, and the warning that follows (what --signal=USR1@N sends) leaves no time at all
    started = datetime.fromisoformat(slurm.job(job_id)["StartTime"]).timestamp()
    time.sleep(max(0.0, started + 62 - time.time()))
    slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=1")
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: "too short" in out.read_text(), "the trainer's word", slurm, out)
    assert re.search(r"SIGUSR1: the emergency snapshot took [\d.]+ s, but the job's time limit was "
                     r"0\.0 s away: --signal is too short", out.read_text()), out.read_text()
    assert "the signal's time is too short for this state" in daemon.log_text()
    [job] = [j for j in daemon_status(daemon.endpoint)["jobs"] if j["job"] == "late"]
    assert job["last_emergency_grace_s"] == 0.0 and job["last_emergency_s"] > 0, job
    text = subprocess.run([sys.executable, "-m", "snapd", "status", "--endpoint", daemon.endpoint],
                          capture_output=True, text=True).stdout
    assert "TOO SHORT" in text, text


IN_ALLOCATION = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp}/{job}-%j.out
# the daemon inside the allocation, as deploy/slurm/train.sbatch starts it where the node has no unit
srun --ntasks=1 --overlap --kill-on-bad-exit=0 {python} -m snapd serve --root {tmp}/root \\
    --endpoint {endpoint} --drain-timeout-s 15 >> {tmp}/daemon.log 2>&1 &
for _ in $(seq 150); do
    {python} -m snapd status --endpoint {endpoint} >/dev/null 2>&1 && break; sleep 0.2
done
exec {python} {train} {endpoint} {job} 100000 10
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("signal_name", ["TERM", "USR1"])
def test_a_daemon_inside_the_allocation_takes_the_emergency_snapshot_of_the_job_it_stops_with(
        slurm, tmp_path, signal_name):
    """The daemon runs as a step of the job (no unit on the node). Preemption or requeue signals
    every step at once, the daemon's too: it must still take the trainer's emergency snapshot (it
    exited at once and the snapshot found no one), and the time limit's warning (--signal=USR1@N,
    to every step) must not kill it (SIGUSR1's default action). The requeued run resumes from the
    emergency snapshot, bit for bit."""
    endpoint = f"ipc://{tmp_path}/d.sock"
    script = tmp_path / "alloc.sbatch"
    script.write_text(IN_ALLOCATION.format(tmp=tmp_path, job="alloc", python=sys.executable, train=TRAIN,
                                           endpoint=endpoint))
    job_id = slurm.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    out = tmp_path / f"alloc-{job_id}.out"
    try:
        wait_for(lambda: steps_done(out) >= 13, "training", slurm, out)
        before = steps_done(out)
        if signal_name == "TERM":
            slurm.run("scontrol", "requeue", job_id)  # SIGTERM to every step, KillWait, SIGKILL
        else:  # what --signal=USR1@N sends before the time limit; the trainer then requeues the job
            slurm.run("scancel", "--full", "--signal=USR1", job_id)
        wait_for(lambda: "RESUMED" in out.read_text(), "requeued run", slurm, out)
        text = out.read_text()
        dumped = re.findall(rf"SIG{signal_name}: emergency snapshot of step (\d+) persisted", text)
        resumed = re.search(r"RESUMED (\d+) (\w+) (\w+)", text)
        assert len(dumped) == 1 and resumed and resumed.group(1) == dumped[0] and int(dumped[0]) >= before, \
            (text, (tmp_path / "daemon.log").read_text())
        assert resumed.group(2) == resumed.group(3) and "RESTART 1" in text, text
        log = (tmp_path / "daemon.log").read_text()
        said = "waiting up to 25 s for the emergency snapshots of 1 client(s)" if signal_name == "TERM" else \
            "SIGUSR1: a scheduler's warning"
        assert said in log, log
    finally:
        slurm.run("scancel", job_id, check=False)
