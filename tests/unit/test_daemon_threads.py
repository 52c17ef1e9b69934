"""State the daemon's threads share (snapd/daemon/__init__.py says which thread owns what): what
``snapd status`` reads while the flush thread writes, and the job lock, which no writer holds
while it deletes what retention took."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

import snapd.client as snapd
from snapd.daemon.codec_choice import Choice
from snapd.daemon.config import DaemonConfig
from snapd.daemon.server import Server
from snapd.format.jobdir import LOCK_NAME, JobDir


@pytest.fixture
def server(tmp_path):
    shm = Path("/dev/shm") / f"snapd-test-threads-{os.getpid()}"
    shm.mkdir()
    ctx = zmq.Context()
    config = DaemonConfig(root=tmp_path / "root", endpoint=f"ipc://{tmp_path}/s.sock",
                          host_buffer_bytes=1 << 20, shm_dir=shm)
    config.root.mkdir()
    srv = Server(config, ctx)
    yield srv
    srv.close()
    ctx.term()
    shutil.rmtree(shm)


def test_status_lists_the_codec_choices_while_the_flush_thread_adds_them(server) -> None:
    """(Iterating the flush thread's own dict here once failed with "dictionary changed size during
    iteration" once enough jobs had choices.)"""
    stop = threading.Event()

    def flush_thread() -> None:
        i = 0
        while not stop.is_set():
            server.pipeline.codecs.put(str(server.config.root / f"job{i}"), Choice("raw", "test", {}))
            i += 1
    t = threading.Thread(target=flush_thread)
    t.start()
    try:
        seen = 0
        while seen < 5000:
            st = server.status.of()
            assert all(c == {"codec": "raw", "reason": "test"} for c in st["codecs"].values())
            seen = len(st["codecs"])
    finally:
        stop.set()
        t.join()


def test_retention_deletes_after_letting_go_of_the_job_lock(root, monkeypatch) -> None:
    """Deleting a large snapshot takes seconds: another writer of the job (a second rank's save, the
    daemon's next flush) must not wait for it."""
    for step in (1, 2):
        snapd.save(root, "j", {"w": np.arange(1000)}, step=step, keep_last=2)
    removed, lock_free = [], []
    remove = JobDir.remove

    def watching(trash: list[Path]) -> None:
        fd = os.open(root / "j" / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the writer still holds it
            fcntl.flock(fd, fcntl.LOCK_UN)
            lock_free.append(True)
        finally:
            os.close(fd)
        removed.extend(p.name for p in trash)
        remove(trash)
    monkeypatch.setattr(JobDir, "remove", staticmethod(watching))
    snapd.save(root, "j", {"w": np.arange(1000)}, step=3, keep_last=2)
    assert lock_free and any(name.startswith(".trash-step-000000000001") for name in removed)
    assert [s.step for s in snapd.list_snapshots(root, "j")] == [2, 3]
    assert not [p for p in (root / "j").iterdir() if p.name.startswith(".trash")]
