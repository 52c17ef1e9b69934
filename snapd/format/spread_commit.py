"""Global snapshots whose parts lie on several nodes' own disks (nodes that share no filesystem;
docs/FORMAT.md section 10).

Each node's daemon delivers its ranks' parts into its own root as usual (snapd.format.global_commit)
and learns the other ranks' part manifests from their daemons (snapd.daemon.peer_commits). Once
it knows every rank's manifest, it commits the step in its own root with the same assembly and the
same rename: ``step-N/`` then holds the global manifest and this node's parts; a part of another
node is fetched from a peer when a reader needs it (snapd.daemon.part_fetch). Every node commits
the same parts, so every node's global manifest names the same part checksums.

``adopt`` commits, on a node that has none of its parts (a replacement node), a global snapshot
whose manifest came from a peer: the parts then all come from peers. ``adopt_whole`` commits a
single process's snapshot brought whole from a peer's copy (section 6's rule, as its writer would).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from snapd.errors import CommitFailed, FormatError
from snapd.format import global_commit, step_outcome
from snapd.format import index as jobindex
from snapd.format.step_outcome import Delivery
from snapd.format.global_manifest import GlobalManifest, parse_any, part_dir
from snapd.format.jobdir import JobDir, fsync_dir, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse
from snapd.format.retention import Retention, tidy

log = logging.getLogger(__name__)


def commit_known(d: Delivery, known: dict[int, Manifest], retention: Retention) -> bool:
    """Commit ``d``'s step from the parts delivered here and ``known``, the other ranks' manifests
    (from their nodes); False while a rank is neither here nor known, or when it was given up."""
    job, world = d.job, d.world_size
    with job.lock():
        if step_outcome.outcome(d, count=False).state != "waiting":
            return False
        pend = d.pending
        local = {r for r in range(world) if (pend / part_dir(r) / MANIFEST_NAME).exists()}
        if not set(range(world)) <= local | set(known):
            return False
        parts = []
        for r in range(world):
            if r in local:
                m = parse(read_regular(pend / part_dir(r) / MANIFEST_NAME))
                if r in known and known[r].checksum != m.checksum:
                    why = (f"rank {r}'s part of step {d.step} came from two nodes: two processes "
                           "claim one rank")
                    global_commit.fail_step_locked(job, d.step, world, d.run, why)
                    return False
                parts.append(m)
            else:
                parts.append(known[r])
        try:
            entry, trash = global_commit.commit_pending(job, pend, parts, retention)
        except CommitFailed as e:
            log.warning("%s", e)
            return False
    job.remove(trash)
    log.info("%s: step %d committed from the parts of %d ranks (%d of them on this node)", job.path, d.step,
             world, len(local))
    return True


def adopt(job: JobDir, raw: bytes, retention: Retention, where: str) -> Path:
    """Commit a global manifest fetched from ``where`` (a peer) as a snapshot of ``job`` whose parts
    are all elsewhere; a step already here is left as it is."""
    m = parse_any(raw, where)
    if not isinstance(m, GlobalManifest):
        raise FormatError(f"{where}: not a global snapshot's manifest")
    final = job.path / snapshot_name(m.step)
    job.open_for_write()
    with job.lock():
        if (final / MANIFEST_NAME).exists():
            return final
        tmp = job.new_tmp_dir(m.step)
        with open(tmp / MANIFEST_NAME, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        index = jobindex.load(job)
        trash = job.install(tmp, m.step)
        trash += tidy(job, index, jobindex.Entry.of(m), retention)
    job.remove(trash)
    log.info("%s: step %d adopted from %s; its %d parts are on other nodes", job.path, m.step, where,
             m.world_size)
    return final



def adopt_whole(job: JobDir, tmp: Path, m: Manifest, retention: Retention, where: str) -> Path:
    """Commit ``tmp``, a temporary directory of ``job`` holding a single process's snapshot ``m``
    brought from ``where`` and checked: its files made durable, then renamed into place under the
    job's lock with retention and the index; a step already here is left as it is."""
    final = job.path / snapshot_name(m.step)
    for name in os.listdir(tmp):
        fd = os.open(tmp / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(tmp)
    with job.lock():
        if (final / MANIFEST_NAME).exists():
            return final
        index = jobindex.load(job)
        trash = job.install(tmp, m.step)
        trash += tidy(job, index, jobindex.Entry.of(m), retention)
    job.remove(trash)
    log.info("%s: step %d brought whole from %s and committed", job.path, m.step, where)
    return final
