"""Daemons with separate roots on loopback TCP that stand for the nodes of a cluster (issue 26),
for the peer tests (tests/integration/test_peer*.py, through the ``peer_nodes`` fixture)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapd.peers.keys import create

RANK = Path(__file__).parent / "scripts" / "rank_job.py"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def peer_daemon(start, *extra: str, **kw):
    """A daemon serving its peers on a free loopback port (``--peer-endpoint``), found again when the
    port was taken between being found free and bound (as ``Nodes`` does)."""
    for attempt in range(3):
        try:
            return start("--peer-endpoint", f"tcp://127.0.0.1:{free_ports(1)[0]}", *extra, **kw)
        except pytest.fail.Exception as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise


class Nodes:
    """``n`` daemons, each with its own root, that know each other as peers (one cluster key):
    from the list each is given, or (``listed=False``) only from what their jobs' ranks tell them."""

    def __init__(self, tmp: Path, start, n: int, *extra: str, replica_dirs: bool = False,
                 listed: bool = True) -> None:
        self.tmp, self._start, self.extra, self.replica_dirs = tmp, start, extra, replica_dirs
        self.listed = listed
        self.keys = tmp / "keys"
        create(self.keys)
        for attempt in range(3):  # (a port found free may be taken before its daemon binds it: -n 2)
            # sorted: node i is the i-th round the ring, so node i's replicas go to node i + 1
            self.endpoints = sorted(f"tcp://127.0.0.1:{p}" for p in free_ports(n))
            self.daemons = []
            try:
                for i in range(n):
                    self.daemons.append(self.start(i))
                return
            except pytest.fail.Exception as e:
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
                for d in self.daemons:
                    d.proc.kill()
                    d.proc.wait()
                for i in range(n):
                    shutil.rmtree(self.tmp / f"node{i}", ignore_errors=True)

    def start(self, i: int):
        own = ("--replica-dir", str(self.tmp / f"replicas{i}")) if self.replica_dirs else ()
        listed = ("--peers", ",".join(self.endpoints)) if self.listed else ()
        return self._start("--peer-endpoint", self.endpoints[i], *listed, "--peer-keys", str(self.keys),
                           "--node-name", f"node{i}", "--peer-timeout-s", "2",
                           *self.extra, *own, name=f"node{i}-{time.monotonic_ns()}",
                           root=self.tmp / f"node{i}")

    def lose(self, i: int) -> None:
        """Node ``i`` is gone: its daemon killed, its disk with it."""
        d = self.daemons[i]
        d.proc.kill()
        d.proc.wait()
        shutil.rmtree(d.root)
        shutil.rmtree(self.tmp / f"replicas{i}", ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {d.log}\n{d.log_text()[-3000:]}" for d in self.daemons)

    def status(self, i: int) -> dict:
        return self.status_of(self.daemons[i].endpoint)

    @staticmethod
    def status_of(endpoint: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "snapd", "status", "--json", "--endpoint", endpoint],
                             capture_output=True, text=True, cwd="/")
        return json.loads(out.stdout)


def ranks(nodes: Nodes, job: str, run: str, steps: str, *more: str, world: int = 3) -> list[str]:
    procs = [subprocess.Popen([sys.executable, str(RANK), nodes.daemons[r].endpoint, job, str(r), str(world),
                               run, steps, *more], stdout=subprocess.PIPE, text=True, cwd="/")
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(nodes.logs())
    return outs
