"""``connect()``: find the daemon for a job (or start a private one), check it is one this user
may hand tensors to, and say hello; ``snapshot()`` through a default client."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from snapd.client.connection import Connection, probe
from snapd.client.daemon import Client
from snapd.client.group_peers import ListedPeers, check_listed
from snapd.client.pending import Pending
from snapd.client.ranks import detect
from snapd.client.ranks import run_id as find_run_id
from snapd.errors import DaemonUnavailable, InvalidArgument, PermissionDenied
from snapd.format.index import check_best, check_retention
from snapd.format.jobdir import check_job_name
from snapd.format.rank_parts import check_per_rank
from snapd.ownership import check_socket_owner
from snapd.paths import access_problem, check_endpoint, default_endpoint, default_root, socket_path

__all__ = ["connect", "snapshot"]

log = logging.getLogger(__name__)


def connect(job: str, *, endpoint: str | None = None, root: str | os.PathLike | None = None,
            spawn: bool = True, keep_last: int | None = 5, keep_every_steps: int | None = None,
            best: tuple[str, str] | None = None, on_busy: str = "wait", timeout_s: float = 10.0,
            host_buffer_bytes: int | None = None, rank: int | None = None,
            world_size: int | None = None, per_rank: Any = None, run_id: str | None = None,
            replicas: int | None = None, peers: list[str] | None = None) -> Client:
    """Connect to the daemon for ``job``; with ``spawn``, start a private one if none answers.
    The rank and world size are learned (client/ranks.py); ``rank=``/``world_size=`` where no
    process group or launcher says them. On several ranks each ``snapshot`` is this rank's part of
    one global snapshot (DTensors as their local shards; docs/usage.md): ``per_rank`` names the key
    paths whose values are each rank's own (RNG state, a dataloader's position); ``run_id``: see
    client/ranks.py (learned from the launcher or the process group where not given). ``replicas``:
    how many other nodes hold a copy of each rank's part, where the daemon has peers (docs/peers.md;
    default: the daemon's ``replicas``). ``peers``: the job's other daemons (``tcp://HOST:PORT``
    as their peers reach them), beside the daemon's own; without it, a job in a process group finds
    them through the group (client/group_peers.py)."""
    check_job_name(job)
    ranks = detect(rank, world_size)
    per_rank = check_per_rank(per_rank)
    run = find_run_id(run_id, ranks)
    check_retention(keep_last, keep_every_steps)
    listed = check_listed(peers)
    if replicas is not None and (type(replicas) is not int or not 0 <= replicas <= 8):
        raise InvalidArgument(f"replicas must be an int in 0..8, got {replicas!r}")
    best = check_best(best)
    if on_busy not in ("wait", "skip"):
        raise InvalidArgument(f"on_busy must be 'wait' or 'skip', got {on_busy!r}")
    endpoint = check_endpoint(endpoint or default_endpoint())
    check_socket_owner(socket_path(endpoint), endpoint)  # (snapd.ownership: not another user's socket)
    if probe(endpoint, min(timeout_s, 1.0)) is None:
        refused = access_problem(endpoint)
        if refused:
            raise PermissionDenied(refused)
        if not spawn:
            raise DaemonUnavailable(f"no snapd answers at {endpoint} (start one with `snapd serve`, "
                                    "or connect with spawn=True)")
        spawn_root = Path(root) if root is not None else default_root()
        from snapd.client.spawn import spawn_daemon

        spawn_daemon(endpoint, spawn_root, timeout_s, host_buffer_bytes)
        log.info("mode: private daemon spawned for this job")
    else:
        log.info("mode: shared daemon at %s", endpoint)
    hello = {"job": job, "pid": os.getpid(), "keep_last": keep_last, "keep_every_steps": keep_every_steps,
             "best": list(best) if best else None, "on_busy": on_busy,
             "root": str(root) if root is not None else None, "notices": True, "rank": ranks.rank,
             "world_size": ranks.world_size, "local_rank": ranks.local_rank, "per_rank": list(per_rank),
             "run": run, "replicas": replicas}
    if "torch" in sys.modules:  # (the devices the trainer works on: the daemon gets ready for them)
        from snapd.client.cuda_export import devices_in_use
        hello["cuda_devices"] = devices_in_use()
    conn = Connection(endpoint, timeout_s)
    try:
        welcome = conn.call("hello", **hello)
        conn.session = True
    except TimeoutError:
        conn.close()
        raise DaemonUnavailable(f"the daemon at {endpoint} did not answer hello within {timeout_s} s") \
            from None
    except BaseException:
        conn.close()
        raise
    client = Client(job, conn, welcome, hello, ranks)
    if listed is not None:  # (the job's daemons as it lists them; the process group is then not asked)
        client._group = ListedPeers(conn, listed)
        try:
            client._group.start()
        except BaseException:
            client.close()
            raise
    client._job_peers()  # (the job's daemons find each other through its process group: docs/peers.md)
    return client


_default: Client | None = None


def snapshot(state: Any, *, step: int, metrics: dict | None = None, emergency: bool = False) -> Pending:
    """Snapshot through a default client: job ``$SNAPD_JOB``, else the script's name."""
    global _default
    if _default is None or _default._conn.closed:
        job = os.environ.get("SNAPD_JOB") or Path(sys.argv[0] or "python").stem or "python"
        job = "".join(c if c.isalnum() or c in "._-" else "-" for c in job).lstrip(".-") or "python"
        _default = connect(job)
    return _default.snapshot(state, step=step, metrics=metrics, emergency=emergency)
