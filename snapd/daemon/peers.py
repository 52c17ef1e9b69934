"""The daemon's peers, as one part of it: the peer server, the part book, replication and
restore from peers (docs/peers.md), built when ``peer_endpoint`` is set.

The stages call ``delivered`` when a rank part is durable (replication announces it and copies it
to the replica holders); the rank-commits thread asks the part book to commit; the server thread
hands ``locate`` and ``fetch`` requests to ``pool`` (they wait on peers: never on its thread).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from snapd.daemon.channels import OffThread, post
from snapd.daemon.config import DaemonConfig
from snapd.daemon.bucket_parts import BucketParts
from snapd.daemon.part_fetch import PartFetch
from snapd.daemon.peer_commits import PartBook
from snapd.daemon.peer_server import PeerServer
from snapd.daemon.prefetch import Prefetch
from snapd.daemon.rank_commits import Waiting
from snapd.daemon.outgoing import Outgoing
from snapd.daemon.replication import Replication
from snapd.daemon.tasks import Task
from snapd.format.step_outcome import Delivery
from snapd.format.global_manifest import part_dir
from snapd.errors import InvalidArgument
from snapd.format.jobdir import JobDir, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, parse
from snapd.format.retention import Retention
from snapd.peers.directory import PeerDirectory, PeerInfo
from snapd.peers.keys import PeerKeys
from snapd.peers.replicas import ReplicaStore
from snapd.peers.wire import check_peer_address
from snapd.remote.bandwidth import Pacer

log = logging.getLogger(__name__)

PER_CLIENT = 16  # a client's locate/fetch_part requests waiting at once (a rank's reader threads: 8)


def default_replica_memory_bytes() -> int:
    """A quarter of the node's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class Peers:
    def __init__(self, config: DaemonConfig, retention: Callable[[Task], Retention],
                 ctx: zmq.Context) -> None:
        assert config.peer_endpoint is not None and config.peer_keys is not None
        self.ctx = ctx  # (the server thread's: answers go to its events socket)
        keys = PeerKeys.load(config.peer_keys)
        self.node = config.node_name or socket.gethostname()
        store = None
        if config.remote is not None:  # (the bucket is where nodes that share nothing else meet)
            from snapd.remote.store import Store

            store = Store.open(config.remote, endpoint_url=config.endpoint_url)
        self.directory = PeerDirectory(config.peer_endpoint, self.node, config.peers, config.peer_directory,
                                       store)
        memory = config.replica_memory_bytes
        self.book = PartBook(config.root, retention)
        self.store = ReplicaStore(default_replica_memory_bytes() if memory is None else memory,
                                  config.replica_dir, self.book.committed)
        self.book.on_committed = self.store.prune
        self.store.load_disk()  # (replicas a previous run of this daemon kept on disk)
        self.server = PeerServer(config.peer_endpoint, self.node, keys, config.root, self.store,
                                 self.book.announce)
        pace = Pacer(config.peer_bytes_per_s).take if config.peer_bytes_per_s else (lambda n: None)
        self.replication = Replication(keys, self.directory, pace, config.peer_timeout_s, config.peer_check_s,
                                       config.root)
        self.fetch = PartFetch(keys, self.directory, config.root, self.store, config.peer_timeout_s,
                               None if store is None else BucketParts(store))
        self.prefetch = Prefetch(self.fetch)
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="snapd-peer-restore")
        # (locate, fetch_part: they wait on other nodes; answered from the pool)
        self._answers = OffThread(lambda event: post(self.ctx, event), self.pool.submit, PER_CLIENT)
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int, int], Outgoing] = {}  # parts made here, their step not committed
        self.replicas = config.replicas

    def start(self) -> None:
        self.directory.start()
        self.server.start()
        self.pool.submit(self.replication.take_up_record)  # (its holders may have restarted meanwhile)
        log.info("peers: %s (node %s) serves its peers; replicas %d, to %s; peers now %s",
                 self.directory.own, self.node, self.replicas,
                 [p.endpoint for p in self.directory.replica_targets(self.replicas)] or "none yet",
                 [p.endpoint for p in self.directory.all()] or "none")

    def stop(self) -> None:
        self.directory.stop()
        self.prefetch.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.fetch.bucket is not None:
            self.fetch.bucket.close()
        self.replication.stop()
        self.server.stop()

    # -- requests of this node's clients, answered off the server thread ------------------
    def hello(self, job_dir: JobDir, retention: Retention, rank: int, world_size: int) -> None:
        """A rank connected: its part (a single process: its snapshot) starts coming here
        (snapd.daemon.prefetch)."""
        self.prefetch.hello(job_dir, self.book.job_path(job_dir.path), retention, rank, world_size)

    def learn(self, job_dir: JobDir, uid: int, retention: Retention, rank: int, world_size: int,
              told: list[dict], complete: bool) -> int:
        """A rank of user ``uid`` found its job's daemons through the job's own process group
        (client/group_peers.py): they become that job's peers (its announcements, replicas and
        restores), and its part starts coming here if one of them has it (the prefetch at its hello
        knew none of them). Returns how many peers the job has now."""
        found = []
        for i, p in enumerate(told):
            try:
                endpoint = check_peer_address(p.get("endpoint"))
                found.append(PeerInfo(endpoint, str(p.get("node") or endpoint)[:128]))  # (as a listed one)
            except InvalidArgument as e:
                raise InvalidArgument(f"peers[{i}]: {e}") from None
        job = self.book.job_path(job_dir.path)
        new = self.directory.learn(uid, job, found, complete)
        self.replication.reap(self.directory.known())
        if new:
            log.info("%s: %d peer(s) learned from its ranks: %s", job, len(new),
                     ", ".join(f"{p.endpoint} ({p.node})" for p in new))
            self.pool.submit(self.replication.claim_record, {p.endpoint: p for p in new})
            self.prefetch.hello(job_dir, job, retention, rank, world_size)
        return len(self.directory.all(job=job))

    def locate(self, job_dir: JobDir, step: int | None, retention: Retention, peer: bytes,
               req_id: int) -> None:
        self._off_thread(peer, req_id, "located", lambda: self.fetch.locate(
            job_dir, self.book.job_path(job_dir.path), step, retention))

    def fetch_part(self, job_dir: JobDir, step: int, rank: int, peer: bytes, req_id: int) -> None:
        self._off_thread(peer, req_id, "fetched", lambda: self.fetch.fetch(
            job_dir, self.book.job_path(job_dir.path), step, rank))

    def _off_thread(self, peer: bytes, req_id: int, kind: str, work: Callable[[], dict]) -> None:
        """Run ``work`` on the pool; a client with ``PER_CLIENT`` requests waiting already is busy."""
        self._answers.start(peer, req_id, kind, work, "requests to the peers")

    def delivered(self, task: Task, d: Delivery) -> None:
        """A rank part of this node is durable (waiting for its step, or committed with it)."""
        job = self.book.job_path(d.job.path)
        where = d.job.path / snapshot_name(d.step) if d.committed is not None else d.pending
        raw = read_regular(where / part_dir(d.rank) / MANIFEST_NAME)
        m = parse(raw)
        self.book.mine(job, d.step, d.world_size, d.run, d.rank, self.node, m)
        o = Outgoing.of(job, d.job.path, d.pending, raw, m)
        self.replication.add(o, self.replicas if task.replicas is None else task.replicas)
        for k in [k for k in self._waiting if k[0] == job and k[2] == d.rank]:
            del self._waiting[k]  # (a rank's newer part: its older step has ended)
        if d.committed is None:
            self._waiting[(job, d.step, d.rank)] = o

    def committed_whole(self, task: Task, path: Path) -> None:
        """A single process's snapshot is committed on this node (the seal thread): its copies go to
        the job's replica holders, as rank 0 of 1 (never announced: there is nothing to commit elsewhere)."""
        job_dir = path.parent
        job = self.book.job_path(job_dir)
        raw = read_regular(path / MANIFEST_NAME)
        m = parse(raw)
        self.book.mine(job, task.step, 1, "", 0, self.node, m)
        o = Outgoing.of(job, job_dir, path, raw, m)
        self.replication.add(o, self.replicas if task.replicas is None else task.replicas)

    def waiting(self, w: Waiting) -> None:
        """On the rank-commits thread, for each part of this node waiting for its step: announce it to
        peers found since, and commit the step if every rank's part is now known."""
        key = (self.book.job_path(w.delivery.job.path), w.task.step, w.task.rank)
        o = self._waiting.get(key)
        if o is not None:
            self.replication.announce_new(o)
        self.book.try_commit(w)

    def where(self, senders: list[dict], held: dict) -> dict[str, dict[str, dict[str, Any]]]:
        """Per job, for its newest steps known here: which ranks' parts lie on which node's disk and
        which node holds copies of which (``senders``, ``held``: replication's and the replica
        store's status), and whether the disks alone, or all together, hold the whole step."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (job, step, world), disks in self.book.steps().items():
            replicas: dict[str, list[int]] = {}
            for s in senders:
                ranks = [r for r in range(world) if s["replicated_steps"].get(f"{job}:{r}") == step]
                if ranks:
                    replicas[s["node"]] = ranks
            mine = held["jobs"].get(job, {}).get(str(step))
            if mine:
                replicas[self.node] = sorted(mine)
            on_disks = {r for ranks in disks.values() for r in ranks}
            anywhere = on_disks | {r for ranks in replicas.values() for r in ranks}
            out.setdefault(job, {})[str(step)] = {
                "world_size": world, "disks": {n: sorted(r) for n, r in disks.items()}, "replicas": replicas,
                "complete_on_disks": len(on_disks) == world, "complete": len(anywhere) == world}
        return out

    def status(self) -> dict[str, Any]:
        senders, held = self.replication.status(), self.store.status()
        lag = max((s["oldest_s"] for s in senders), default=0.0)
        return {"endpoint": self.directory.own, "node": self.node, "replicas": self.replicas,
                "targets": [p.endpoint for p in self.directory.replica_targets(self.replicas)],
                "learned_jobs": self.directory.learned_jobs(),
                "peers": senders, "lag_s": lag, "held": held,
                "refused": self.server.refused, "fetched_bytes": self.fetch.fetched_bytes,
                "damaged_copies": self.fetch.damaged, "prefetched_parts": self.prefetch.brought,
                "jobs": self.where(senders, held)}
