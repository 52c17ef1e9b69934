"""A user's removal of one of their job's snapshots (``remove``: ``Client.remove``, ``snapd rm``, a
framework's own retention through the daemon).

Where the daemon serves several users, their directories are its own: a user may read their
snapshots, not delete them, and without this a finished job's snapshots stayed on the node's disk,
counted in the user's quota, until an operator removed them. The removal runs off the server
thread (the job's lock may be held by another writer for a while; the bucket is a network away):
the step is removed from this node's root (snapd.format.retention.remove_step, which remembers it
removed, so that a restore does not bring back its copies held by peers), then from the remote
tier, once an upload of it going up now has ended. The answer reaches the client through the
server thread's events socket.

Refused, saying why: a step still being written (remove it once persisted), and a step of a job
on several ranks on a daemon with peers, whose other nodes commit the step on their own disks and
would go on resuming from it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from snapd.daemon.channels import OffThread
from snapd.daemon.sessions import Session
from snapd.daemon.tasks import TaskTable
from snapd.daemon.uploads import Uploader
from snapd.errors import Busy, InvalidArgument, SnapdError
from snapd.format.global_manifest import GlobalManifest, parse_any
from snapd.format.jobdir import JobDir, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME
from snapd.format.retention import remove_step
from snapd.remote.remote_job import RemoteJob

log = logging.getLogger(__name__)

PER_CLIENT = 4  # removals of one client under way at once
AT_ONCE = 16  # removals of all clients under way at once (each takes a thread)
UPLOAD_WAIT_S = 600.0  # how long a removal waits for an upload of its step going up now


class Removals:
    def __init__(self, tasks: TaskTable, uploads: Uploader | None, peers: Any,
                 post: Callable[[dict], None]) -> None:
        self.tasks = tasks
        self.uploads = uploads
        self.peers = peers  # (snapd.daemon.peers.Peers, or None: no other node holds the job's parts)
        self._answers = OffThread(post, _thread, PER_CLIENT, AT_ONCE)

    def remove(self, s: Session, step: int, peer: bytes, req_id: int) -> None:
        """(The server thread.) Start removing ``step`` of the session's job; answered ``removed``."""
        job = JobDir(s.jobs_root, s.job)
        if any(t.job == s.job and t.root == s.jobs_root and t.step == step for t in self.tasks):
            raise Busy(f"step {step} of job {s.job} is being written: remove it once it is persisted "
                       "(its snapshot's wait(), or sync())")
        # (the user's quota is measured again before the answer: snapd.daemon.endings)
        self._answers.start(peer, req_id, "removed", lambda: self._remove(job, step), "removals",
                            {"quota_root": str(job.root)})

    @staticmethod
    def _global(job: JobDir, step: int) -> bool:
        try:
            m = parse_any(read_regular(job.path / snapshot_name(step) / MANIFEST_NAME))
        except (OSError, SnapdError):
            return False
        return isinstance(m, GlobalManifest)

    def _remove(self, job: JobDir, step: int) -> dict[str, Any]:
        if self.peers is not None and self._global(job, step):  # (here: a global manifest may be MBs)
            raise InvalidArgument(f"step {step} of job {job.job} is a global snapshot, which each of its "
                                  "nodes commits on its own disk: removed on this node alone, the others "
                                  "would go on resuming from it (remove a multi-node job's steps by its "
                                  "retention)")
        try:
            taken = remove_step(job, step) if job.path.is_dir() else None  # (none here: the bucket's?)
        except OSError as e:
            raise SnapdError(f"step {step} of job {job.job}: {e}") from None
        remote = None
        if self.uploads is not None:
            path = job.path / snapshot_name(step)
            if not self.uploads.wait_not_uploading(path, UPLOAD_WAIT_S):
                raise Busy(f"step {step} of job {job.job} was removed here, but its upload to the remote "
                           f"tier has not ended within {UPLOAD_WAIT_S:.0f} s: it may still be there")
            rjob = RemoteJob(self.uploads.store, self.uploads.remote_job(job.root, job.job))
            if step in rjob.steps():
                rjob.delete(step)
                remote = rjob.where(path.name)
                log.info("removed %s at its user's request", remote)
        return {"step": step, "removed": taken is not None, "remote": remote}


def _thread(run: Callable[[], None]) -> None:
    threading.Thread(target=run, name="snapd-remove", daemon=True).start()
