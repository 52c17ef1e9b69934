"""Growing ahead: when a starting buffer grows for a snapshot, the other starting buffer gets a grown
successor, so that the next snapshot of that size (an emergency one at preemption above all) finds a
buffer ready instead of waiting for one to be made. Real buffers in /dev/shm made on the pool's
threads; this test stands in for the server thread, which alone collects them (``replaced``), so
that it decides what a request finds while a buffer is still being made."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from snapd.daemon.buffers import BufferPool
from snapd.daemon.config import DaemonConfig
from snapd.daemon.leases import Leases
from snapd.daemon.metrics import Metrics
from snapd.daemon.prefault import PIECE, Prefault
from snapd.daemon.sessions import Session
from snapd.daemon.tasks import TaskTable
from snapd.errors import Busy
from snapd.format import index
from snapd.format.jobdir import JobDir
from snapd.format.writer import Retention

MIB = 1 << 20


class Server:
    """Leases over a real pool, the replies kept by peer."""

    def __init__(self, shm: Path, memory: int) -> None:
        self.config = DaemonConfig(root=shm / "root", endpoint=f"ipc://{shm}/s.sock", host_buffer_bytes=MIB,
                                   max_host_buffer_bytes=64 * MIB, max_host_memory_bytes=memory, shm_dir=shm)
        self.pool = BufferPool(shm, 2, MIB)
        self.sessions: dict[bytes, Session] = {}
        self.replies: dict[bytes, list[dict]] = {}
        self._made = threading.Semaphore(0)
        self.leases = Leases(self.config, self.pool, Metrics(), self.sessions, TaskTable(), self,
                             lambda h: h.run(), lambda event: self._made.release())

    def send(self, peer: bytes, reply: bytes) -> None:  # (the leases' reply sender)
        self.replies.setdefault(peer, []).append(json.loads(reply))

    def client(self, job: str, on_busy: str = "wait") -> Session:
        s = Session(f"{job}-{len(self.sessions)}".encode(), job, os.getpid(), os.geteuid(), self.pool.shm_dir,
                    Retention(), on_busy)
        self.sessions[s.peer] = s
        return s

    def collect_one(self) -> None:
        """Wait for one buffer to be made, and take it in as the server thread would."""
        assert self._made.acquire(timeout=30), "no buffer was made"
        self.leases.replaced()

    def granted(self, s: Session) -> dict:
        (reply,) = [r for r in self.replies.pop(s.peer, []) if r["type"] == "granted"]
        return reply

    def sizes(self) -> list[tuple[int, int]]:
        return sorted((b.index, b.size) for b in self.pool.buffers)


@pytest.fixture
def server(request):
    shm = Path("/dev/shm") / f"snapd-test-{os.getpid()}-{request.node.name[:24]}"
    shm.mkdir()
    made: list[Server] = []
    yield lambda memory=256 * MIB: made.append(Server(shm, memory)) or made[-1]
    for srv in made:
        srv.pool.close()
    shutil.rmtree(shm)


def test_the_partner_of_a_grown_buffer_is_grown_ahead_and_the_next_large_snapshot_finds_it(server) -> None:
    srv = server()
    a = srv.client("rank0")
    assert srv.leases.acquire(a, 1, 3 * MIB, False) is None  # buffer 0 grows for it
    srv.collect_one()
    first = srv.granted(a)
    assert first["buffer"] == 0 and first["bytes"] == 64 * MIB
    assert not srv.leases.maker.making  # nothing competes with the snapshot's copy into buffer 0 ...
    srv.leases.copied(first["lease"])  # ... once it is in, buffer 1 gets a grown successor
    srv.collect_one()  # it takes buffer 1's place, which was free
    assert srv.sizes() == [(0, 64 * MIB), (1, 64 * MIB)]
    emergency = srv.client("rank0-sigterm")
    grant = srv.leases.acquire(emergency, 2, 3 * MIB, True)  # while the first is still being persisted
    assert grant is not None and json.loads(grant)["buffer"] == 1  # at once: nothing is made for it
    assert len(srv.pool.buffers) == 2


def test_while_the_successor_is_made_the_small_buffer_serves_on_and_a_large_request_waits_for_it(
        server) -> None:
    srv = server()
    a, small, large = srv.client("rank0"), srv.client("small", on_busy="skip"), srv.client("large")
    srv.leases.acquire(a, 1, 3 * MIB, False)
    srv.collect_one()
    srv.leases.copied(srv.granted(a)["lease"])  # buffer 0; buffer 1's successor is being made now
    grant = srv.leases.acquire(small, 2, 100, False)
    assert grant is not None and json.loads(grant)["buffer"] == 1 and json.loads(grant)["bytes"] == MIB
    assert srv.leases.acquire(large, 3, 3 * MIB, True) is None  # it waits for the successor ...
    assert len(srv.pool.buffers) == 3  # ... rather than having a fourth buffer made for it
    srv.collect_one()
    got = srv.granted(large)
    assert got["bytes"] == 64 * MIB and got["buffer"] not in (0, 1)  # buffer 1 was busy: one buffer more
    assert srv.sizes() == [(0, 64 * MIB), (1, MIB), (got["buffer"], 64 * MIB)]


def test_a_skipping_client_is_told_the_buffer_is_being_made_and_a_later_snapshot_gets_it(server) -> None:
    srv = server()
    a, skip = srv.client("rank0"), srv.client("rank1", on_busy="skip")
    srv.leases.acquire(a, 1, 3 * MIB, False)
    srv.collect_one()
    srv.leases.copied(srv.granted(a)["lease"])

    with pytest.raises(Busy, match=r"being made ready for snapshots of this size \(67108864 bytes\)"):
        srv.leases.acquire(skip, 2, 3 * MIB, False)
    srv.collect_one()
    grant = srv.leases.acquire(skip, 3, 3 * MIB, False)
    assert grant is not None and json.loads(grant)["buffer"] == 1


def test_without_memory_for_both_grown_buffers_nothing_is_grown_ahead(server) -> None:
    srv = server(memory=100 * MIB)  # one grown buffer and the small one; not two grown
    a = srv.client("rank0")
    srv.leases.acquire(a, 1, 3 * MIB, False)
    srv.collect_one()
    srv.leases.copied(srv.granted(a)["lease"])
    assert srv.sizes() == [(0, 64 * MIB), (1, MIB)] and not srv.leases.maker.making


def test_a_finished_job_gives_the_grown_buffers_back(server) -> None:
    srv = server()
    a = srv.client("rank0")
    srv.leases.acquire(a, 1, 3 * MIB, False)
    srv.collect_one()
    srv.leases.free(a, srv.granted(a)["lease"])  # (given back without a snapshot: it grows ahead then)
    srv.collect_one()
    assert srv.sizes() == [(0, 64 * MIB), (1, 64 * MIB)]
    del srv.sessions[a.peer]
    srv.leases.restore_start()
    srv.collect_one()
    srv.collect_one()
    assert srv.sizes() == [(0, MIB), (1, MIB)] and not srv.leases.maker.making


def _resumes(srv: Server, job: str, raw_bytes: int) -> None:
    """Job ``job`` has run before: its index records a last snapshot of ``raw_bytes``."""
    jd = JobDir(srv.pool.shm_dir, job)
    jd.path.mkdir()
    index.save(jd, index.JobIndex([index.Entry(7, "step-000000000007", 0.0, raw_bytes, raw_bytes // 2)]))


def test_a_job_that_resumes_finds_its_buffers_grown_for_its_last_snapshot_before_its_first(server) -> None:
    srv = server()
    _resumes(srv, "resumes", 3 * MIB)
    rank0, rank1 = srv.client("resumes"), srv.client("resumes")
    srv.leases.expect(rank0)  # (its hello)
    assert sorted(m.succeeds for m in srv.leases.maker.making.values()) == [0, 1]  # both starting buffers
    srv.leases.expect(rank1)  # a second rank: the two being made are one each
    assert len(srv.leases.maker.making) == 2
    assert srv.leases.acquire(rank0, 1, 3 * MIB, False) is None  # (still being made: it waits for one)
    srv.collect_one()
    srv.collect_one()
    assert srv.granted(rank0)["bytes"] == 64 * MIB
    assert srv.sizes() == [(0, 64 * MIB), (1, 64 * MIB)] and not srv.leases.maker.making
    grant = srv.leases.acquire(rank1, 2, 3 * MIB, False)
    assert grant is not None and json.loads(grant)["bytes"] == 64 * MIB


def test_a_new_job_or_one_whose_last_snapshot_fits_grows_nothing(server) -> None:
    srv = server()
    _resumes(srv, "small", MIB // 2)
    for job in ("new", "small"):
        srv.leases.expect(srv.client(job))
    assert not srv.leases.maker.making and srv.sizes() == [(0, MIB), (1, MIB)]


def _ranks_resume(srv: Server, job: str, parts: list[int]) -> None:
    """Job ``job`` ran on ``len(parts)`` ranks: its last snapshot committed, rank r's part of
    ``parts[r]`` bytes (saved for real, each rank from its own thread, as one global commit)."""
    import snapd.client as snapd

    def save(rank: int) -> None:
        snapd.save(srv.pool.shm_dir, job, {"own": np.zeros(parts[rank], np.uint8)}, step=3, rank=rank,
                   world_size=len(parts), run_id="r", per_rank=["own"], commit_timeout_s=30)
    threads = [threading.Thread(target=save, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [i.step for i in snapd.list_snapshots(srv.pool.shm_dir, job)] == [3]


def _rank(srv: Server, job: str, rank: int, world_size: int) -> Session:
    s = srv.client(job)
    s.rank, s.world_size = rank, world_size
    return s


def test_a_rank_that_resumes_is_sized_for_its_own_part_not_the_whole_jobs(server) -> None:
    """Each node's daemon holds its own ranks' parts: a buffer per rank sized for the whole job
    held world_size times the memory needed (and touched it while the trainer restored)."""
    srv = server()
    _ranks_resume(srv, "parts", [3 * MIB, MIB // 2, MIB // 2])  # rank 0 holds more (its extra state)
    path = JobDir(srv.pool.shm_dir, "parts").path
    assert [index.latest_raw_bytes(path, r, 3) for r in range(3)] == [3 * MIB, MIB // 2, MIB // 2]
    ranks = [_rank(srv, "parts", r, 3) for r in (1, 2)]
    for r in ranks:
        srv.leases.expect(r)  # their parts fit the starting buffers: nothing grows for them
    assert not srv.leases.maker.making and all(r.expects is None for r in ranks)
    zero = _rank(srv, "parts", 0, 3)
    srv.leases.expect(zero)
    assert zero.expects == 64 * MIB and sorted(m.succeeds for m in srv.leases.maker.making.values()) == [0, 1]
    srv.collect_one()
    srv.collect_one()


def test_a_job_that_resumes_on_another_world_size_is_sized_for_an_equal_share(server) -> None:
    srv = server()
    _ranks_resume(srv, "reshard", [3 * MIB, MIB // 2, MIB // 2])  # 4 MiB in all
    path = JobDir(srv.pool.shm_dir, "reshard").path
    assert index.latest_raw_bytes(path) == 4 * MIB  # (resumed on one process: the whole)
    assert [index.latest_raw_bytes(path, r, 8) for r in (0, 7)] == [MIB // 2] * 2
    for r in range(8):
        srv.leases.expect(_rank(srv, "reshard", r, 8))
    assert not srv.leases.maker.making  # (half a MiB each: the starting buffers serve)
    whole = _rank(srv, "reshard", 0, 1)
    srv.leases.expect(whole)
    assert whole.expects == 64 * MIB and len(srv.leases.maker.making) == 2
    srv.collect_one()
    srv.collect_one()


def _resident(view: np.ndarray) -> int:
    """How many of ``view``'s pages are in memory (mincore(2))."""
    pages = -(-view.nbytes // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.nbytes),
                        vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec)


def test_a_buffer_made_in_the_background_and_then_hurried_has_every_page_in_once(server) -> None:
    """One thread at the lowest priority starts; three more join when a request waits (``hurry``);
    every page is faulted in, and the bytes a client may already have written stay."""
    srv = server()
    new = srv.pool._create(9, 3 * PIECE + 5 * mmap.PAGESIZE, os.geteuid())  # 3 pieces and a bit
    try:
        new.view[-1] = 7  # (a byte already there must survive: pages are faulted in, not written)
        assert _resident(new.view) < len(new.view) // mmap.PAGESIZE
        job = Prefault(new.view)
        job.start(1, "test-background")
        job.start(3, "test-hurry")
        job.wait()
        assert _resident(new.view) == -(-new.size // mmap.PAGESIZE) and job.untouched() == 0
        assert new.view[-1] == 7 and not new.view[:PIECE].any()
    finally:
        new.path.unlink()  # (the mapping goes with the views over it)


def test_a_request_that_claims_a_buffer_made_in_the_background_hurries_it(server) -> None:
    srv = server()
    _resumes(srv, "resumes", 3 * MIB)
    a = srv.client("resumes")
    srv.leases.expect(a)  # successors of buffers 0 and 1, made in the background (slots 2 and 3)
    hurried: list[int] = []
    hurry, srv.pool.hurry = srv.pool.hurry, lambda index: hurried.append(index) or hurry(index)
    assert srv.leases.acquire(a, 1, 3 * MIB, True) is None
    srv.collect_one()
    srv.collect_one()
    assert hurried == [2] and srv.granted(a)["bytes"] == 64 * MIB


def test_each_rank_of_a_job_that_resumes_gets_a_buffer_ahead_as_memory_allows(server) -> None:
    srv = server(memory=200 * MIB)  # room for three grown buffers (and the small ones meanwhile), not four
    _resumes(srv, "ranks", 3 * MIB)
    ranks = [srv.client("ranks") for _ in range(4)]
    for r in ranks:
        srv.leases.expect(r)
    made = srv.leases.maker.making.values()
    assert sorted((m.succeeds if m.succeeds is not None else -1, m.size) for m in made) == \
        [(-1, 64 * MIB), (0, 64 * MIB), (1, 64 * MIB)]  # the two starting buffers grown, one added
    for _ in range(3):
        srv.collect_one()
    assert [size for _, size in srv.sizes()] == [64 * MIB] * 3
    grants = [srv.leases.acquire(r, i, 3 * MIB, False) for i, r in enumerate(ranks[:3])]
    assert all(g is not None for g in grants)  # three first snapshots, nothing made for them
    assert srv.leases.acquire(ranks[3], 9, 3 * MIB, False) is None  # the fourth waits for room
