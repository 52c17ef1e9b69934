"""Which parts this daemon's replica holders were sent or are owed, kept across its restarts.

Each sender checks that its holder still holds the newest part of each rank it sent it
(snapd.daemon.peer_sender). A daemon that restarted would know none of them: if a holder then
restarted too (a rolling upgrade of the cluster's daemons), the copies it lost would never be sent
again before the next step. So the daemon writes, after each part a holder took or was queued,
which parts each holder holds or is owed (``ROOT/.snapd-replicated.json``: a hint, replaced whole,
not fsynced), and at start hands them back to the senders of the peers it knows, each part read
again from this node's disk (one that is gone, or that is not what the record says, is left out):
a part queued for a holder that was down when this daemon stopped is sent once it answers, not
only with its rank's next part (which may never come: the job ended, and its node is lost next).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from snapd.daemon.outgoing import Outgoing
from snapd.errors import FormatError, InvalidArgument
from snapd.format.global_manifest import part_dir
from snapd.format.jobdir import read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, parse
from snapd.peers import wire

log = logging.getLogger(__name__)

RECORD_NAME = ".snapd-replicated.json"
MAX_RECORD_BYTES = 16 << 20

Held = dict[str, list[tuple[str, int, int, bool]]]  # endpoint -> [(job, step, rank, whole)]


def save(root: Path, held: Held) -> None:
    body = {"v": 1, "peers": {ep: [list(p) for p in parts] for ep, parts in sorted(held.items()) if parts}}
    tmp = root / f"{RECORD_NAME}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(body, separators=(",", ":")).encode())
        os.replace(tmp, root / RECORD_NAME)
    except OSError as e:  # (a hint: the next one may be written)
        log.warning("%s not written: %s", root / RECORD_NAME, e)
        tmp.unlink(missing_ok=True)


def load(root: Path) -> Held:
    """The record as the last run of this daemon left it; what in it is malformed is left out."""
    path = root / RECORD_NAME
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            raw = read_regular(RECORD_NAME, dir_fd=dfd)  # (a link is refused)
        finally:
            os.close(dfd)
        if len(raw) > MAX_RECORD_BYTES:
            raise FormatError(f"over {MAX_RECORD_BYTES} bytes")
        peers = json.loads(raw)["peers"]
        if not isinstance(peers, dict):
            raise FormatError("no peers")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, FormatError) as e:
        log.warning("%s unreadable (%s): the holders' copies are checked again from the next step on",
                    path, e)
        return {}
    out: Held = {}
    for ep, parts in peers.items():
        try:
            wire.check_peer_address(ep)
            out[ep] = [(wire.check_job_path(j), s, r, w) for j, s, r, w in parts
                       if type(s) is int and type(r) is int and s >= 0 and r >= 0 and type(w) is bool]
        except (InvalidArgument, TypeError, ValueError) as e:
            log.warning("%s: the entry of %s left out: %s", path, str(ep)[:100], e)
    return out


def outgoing(root: Path, job: str, step: int, rank: int, whole: bool) -> Outgoing | None:
    """The part ``rank`` of ``job``'s committed step ``step`` on this node's disk, to send again;
    None when it is not there (retention took it), or is not such a part."""
    job_dir = root / job
    where = job_dir / snapshot_name(step) / ("" if whole else part_dir(rank))
    try:
        raw = read_regular(where / MANIFEST_NAME)
        m = parse(raw, str(where))
    except (OSError, FormatError):
        return None
    if m.step != step or whole != (m.part is None) or (m.part is not None and m.part.get("rank") != rank):
        return None
    return Outgoing.of(job, job_dir, job_dir / snapshot_name(step), raw, m)
