"""The job lock (snapd.format.job_lock): one writer at a time, whether the others are threads of
this process or other processes, and a writer that waits too long is told which job's lock."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from snapd.errors import LockTimeout
from snapd.format.job_lock import hold

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_threads_of_one_process_change_the_job_one_at_a_time(tmp_path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")

    def bump() -> None:
        for _ in range(25):
            with hold(tmp_path, 30.0):
                n = int(counter.read_text())
                time.sleep(0.0005)  # (a lost update shows if two are in here at once)
                counter.write_text(str(n + 1))
    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counter.read_text() == str(8 * 25)


def test_another_process_holding_the_lock_times_out_naming_the_job(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match=str(tmp_path)):
            with hold(tmp_path, 0.3):
                pass
        # a thread queued behind a thread that waits for the other process times out as well
        errors: list[BaseException] = []

        def wait_then_fail() -> None:
            try:
                with hold(tmp_path, 0.3):
                    pass
            except LockTimeout as e:
                errors.append(e)
        threads = [threading.Thread(target=wait_then_fail) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(errors) == 3
    finally:
        proc.stdin.close()
        proc.wait(10)
    with hold(tmp_path, 5.0):  # released by the process's exit: free again
        pass


def test_a_thread_holding_the_lock_keeps_the_others_out_until_it_lets_go(tmp_path) -> None:
    inside, release = threading.Event(), threading.Event()

    def holder() -> None:
        with hold(tmp_path, 5.0):
            inside.set()
            release.wait(10)
    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(10)
    with pytest.raises(LockTimeout):
        with hold(tmp_path, 0.2):
            pass
    release.set()
    t.join(10)
    with hold(tmp_path, 5.0):
        pass
