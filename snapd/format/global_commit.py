"""One commit for a step of a job on several ranks, made on the snapshot root every node mounts.

Each rank's writer (a node's daemon, or ``snapd.save`` in-process) seals its part in a temporary
directory, then ``deliver``s it: under the job's lock it renames the part into
``.pending-<step>-w<world>/rank-NNNNN`` and counts the parts there. The writer that brings the last
one checks them against each other (``assemble``), writes the global manifest beside them and
renames the pending directory to ``step-<step>``: the same atomic rename, index update and retention
as a single-process commit (snapd.format.writer). No rank talks to another and nothing waits on a
collective; the others learn the outcome from the filesystem (``outcome``), and a writer whose part
has waited too long gives the step up (``give_up``): it writes why into the pending directory, so
every rank of that step, and a part arriving late, fails with the same reason.
(snapd.format.step_outcome reads what became of a step.) Why a shared
filesystem and not a coordinator rank, and what the filesystem must provide: docs/FORMAT.md §7.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from snapd import __version__
from snapd.errors import CommitFailed, FormatError, InvalidArgument, SnapdError
from snapd.format import index as jobindex
from snapd.format.global_manifest import PART_DIR_RE, assemble, part_dir
from snapd.format.jobdir import FAILED_NAME, PENDING_RE, JobDir, fsync_dir, pending_name, read_regular, \
    snapshot_name
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse
from snapd.format.retention import Retention, tidy
from snapd.format.step_outcome import Delivery, Outcome, failed_reason, outcome, ranges, ranks_delivered
from snapd.format.writer import Committed

log = logging.getLogger(__name__)

DEFAULT_COMMIT_TIMEOUT_S = 300.0


def deliver(job: JobDir, tmp: Path, part: Manifest, retention: Retention,
            defer_removal: bool = False) -> Delivery:
    """Move a sealed part (``tmp``, its manifest ``part``) into its step's pending directory; commit
    the step if it was the last part. Raises ``CommitFailed`` when the step cannot be committed.
    ``defer_removal``: what retention takes is left in ``committed.trash`` (as ``SnapshotWriter.commit``)."""
    rank, world, run, step = part.part["rank"], part.part["world_size"], part.part["run"], part.step
    out = Delivery(job, step, rank, world, run, part.checksum or "")
    with job.lock():
        run_mark = pending_name(step, world, run).rsplit("-", 1)[1]
        pend = out.pending
        if not pend.is_dir():  # (the first part of this world size looks for another's: one look a step)
            _same_world(job, step, world, run_mark, rank)
            pend.mkdir(exist_ok=True)
        reason = failed_reason(pend)
        if reason is not None:
            raise CommitFailed(f"step {step} of job {job.job} was given up before rank {rank}'s part came: "
                               f"{reason}")
        dst = pend / part_dir(rank)
        if dst.exists():
            raise InvalidArgument(f"step {step} of job {job.job}: rank {rank}'s part is there already: two "
                                  f"processes claim rank {rank} of {world}")
        os.rename(tmp, dst)  # (not fsynced here: the commit fsyncs the pending directory, once)
        have = ranks_delivered(pend)
        out.missing = sorted(set(range(world)) - have)
        if out.missing:
            return out
        try:
            parts = [parse(read_regular(pend / part_dir(r) / MANIFEST_NAME)) for r in range(world)]
        except FormatError as e:
            _mark_failed(pend, f"the ranks' parts disagree: {e}")
            raise CommitFailed(f"step {step} of job {job.job} is not committed: a part is damaged: "
                               f"{e}") from None
        entry, trash = commit_pending(job, pend, parts, retention)
    if not defer_removal:
        job.remove(trash)
        trash = []
    log.info("%s: step %d committed from the parts of %d ranks", job.path, step, world)
    out.committed = Committed(job.path / snapshot_name(step), entry, trash)
    return out


def commit_pending(job: JobDir, pend: Path, parts: list[Manifest],
                   retention: Retention) -> tuple[jobindex.Entry, list[Path]]:
    """Under the job's lock: commit the pending directory ``pend`` from every rank's part manifest
    (``parts[r]``; their files lie in ``pend`` or, on nodes that share no filesystem, on other nodes):
    the global manifest, the rename into place, the index and retention. Returns the index entry
    and what to remove after the lock. ``CommitFailed`` (and the step marked given up) if the parts
    disagree."""
    step = parts[0].step
    try:
        manifest = assemble(parts, f"snapd {__version__}", time.time())
    except FormatError as e:
        _mark_failed(pend, f"the ranks' parts disagree: {e}")
        raise CommitFailed(f"step {step} of job {job.job} is not committed: the ranks' parts disagree: "
                           f"{e}") from None
    with open(pend / MANIFEST_NAME, "wb") as f:
        f.write(manifest.to_bytes())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(pend)
    index = jobindex.load(job)
    trash = job.install(pend, step)
    entry = jobindex.Entry.of(manifest)
    trash += tidy(job, index, entry, retention)
    run_mark = pend.name.rsplit("-", 1)[1]
    trash += [p for name in given_up(job, run_mark) for p in [job.trash(name)] if p is not None]
    return entry, trash


def _same_world(job: JobDir, step: int, world: int, run_mark: str, rank: int) -> None:
    for name in os.listdir(job.path):
        m = PENDING_RE.match(name)
        if m and int(m.group(1)) == step and m.group(3) == run_mark and int(m.group(2)) != world and \
                not (job.path / name / FAILED_NAME).exists():
            raise CommitFailed(f"step {step} of job {job.job}: rank {rank} says world size {world}, "
                               f"but parts of world size {int(m.group(2))} of the same run are waiting "
                               "for it: the world size changed within a run")


def give_up(d: Delivery, waited_s: float) -> Outcome:
    """Give a step up after its part waited ``waited_s`` (unless it was committed meanwhile): every
    rank of it then fails with the reason written here."""
    with d.job.lock():
        now = outcome(d)
        if now.state != "waiting":
            return now
        late = _elsewhere(d.job, d.step, d.run, now.missing)
        reason = (f"rank{'s' if len(now.missing) > 1 else ''} {ranges(now.missing)} of {d.world_size} did "
                  f"not deliver {'their parts' if len(now.missing) > 1 else 'its part'} of step {d.step} "
                  f"within {waited_s:.0f} s{late}")
        _mark_failed(d.pending, reason)
    log.warning("%s: step %d given up: %s", d.job.path, d.step, reason)
    return Outcome("failed", reason)


def wait(d: Delivery, timeout_s: float, poll_s: float = 0.02) -> Committed:
    """Block until the step of ``d`` is committed (``snapd.save`` in-process); ``CommitFailed`` if it
    fails or ``timeout_s`` passes first. Looks every ``poll_s``, backing off to half a second."""
    if d.committed is not None:
        return d.committed
    deadline = time.monotonic() + timeout_s
    while True:
        now = outcome(d, count=False)
        if now.state == "waiting" and time.monotonic() >= deadline:
            now = give_up(d, timeout_s)
        if now.state == "committed":
            entry = jobindex.load(d.job).find(d.step)
            return Committed(Path(now.detail), entry)
        if now.state == "failed":
            raise CommitFailed(f"step {d.step} of job {d.job.job} is not committed: {now.detail}")
        time.sleep(poll_s)
        poll_s = min(0.5, poll_s * 1.5)


def fail_step(job: JobDir, step: int, world_size: int, run: str, reason: str) -> None:
    """A rank's part of ``step`` cannot be made: give the step up now, so the other ranks fail
    with ``reason`` instead of waiting out their timeout (best effort: logged if it cannot)."""
    try:
        with job.lock(timeout_s=10.0):
            fail_step_locked(job, step, world_size, run, reason)
    except (OSError, SnapdError) as e:
        log.warning("%s: step %d could not be marked given up (%s): the other ranks wait for their timeout",
                    job.path, step, e)


def fail_step_locked(job: JobDir, step: int, world_size: int, run: str, reason: str) -> None:
    """``fail_step`` for a caller that holds the job lock (it is not re-entrant)."""
    pend = job.path / pending_name(step, world_size, run)
    pend.mkdir(exist_ok=True)
    if failed_reason(pend) is None:
        _mark_failed(pend, reason)


def leave(d: Delivery) -> None:
    """Take a rank's part out of its pending directory once its step was committed elsewhere (in
    the remote tier, by nodes that share no filesystem): the directory goes with its last part."""
    try:
        with d.job.lock(timeout_s=10.0):
            shutil.rmtree(d.pending / part_dir(d.rank), ignore_errors=True)
            if not any(PART_DIR_RE.match(n) for n in os.listdir(d.pending)):
                shutil.rmtree(d.pending, ignore_errors=True)
    except FileNotFoundError:  # (committed here as well: the pending directory went into place)
        pass
    except (OSError, SnapdError) as e:
        log.warning("%s: rank %d's part of step %d stays in its pending directory (%s); it is removed "
                    "with the leftovers later", d.job.path, d.rank, d.step, e)


def given_up(job: JobDir, run_mark: str) -> list[str]:
    """After a commit by run ``run_mark``: the pending directories of steps given up, and those of
    other runs (a run that committed a step has replaced the run that left them: they can only
    ever be completed by parts of a finished run). ``remove_leftovers`` also removes them."""
    out = []
    for n in os.listdir(job.path):
        m = PENDING_RE.match(n)
        if m and (m.group(3) != run_mark or (job.path / n / FAILED_NAME).exists()):
            out.append(n)
    return out


def _mark_failed(pend: Path, reason: str) -> None:
    tmp = pend / (FAILED_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(reason)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, pend / FAILED_NAME)
    fsync_dir(pend)


def _elsewhere(job: JobDir, step: int, run: str, missing: list[int]) -> str:
    """Where the missing ranks delivered instead, said in the reason: another step's pending parts in
    the same run, a later step's or an earlier one still waiting (an earlier step given up is old)."""
    seen = []
    run_mark = pending_name(step, 1, run).rsplit("-", 1)[1]
    for name in sorted(os.listdir(job.path)):
        m = PENDING_RE.match(name)
        if m and int(m.group(1)) != step and m.group(3) == run_mark and \
                (int(m.group(1)) > step or not (job.path / name / FAILED_NAME).exists()):
            ranks = sorted(set(missing) & ranks_delivered(job.path / name))
            if ranks:
                seen.append(f"rank{'s' if len(ranks) > 1 else ''} {ranges(ranks)} delivered step "
                            f"{int(m.group(1))}")
    return f" ({'; '.join(seen)}: the ranks snapshot different steps)" if seen else ""
