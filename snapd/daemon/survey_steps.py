"""What a survey of a job's snapshots found (snapd.daemon.job_survey asks; snapd.daemon.part_fetch
picks): for each step, the sources of each rank's part, a single process's copies, and the global
snapshot it was committed as, named by the nodes that hold it; a peer's answer to ``have`` added to
them; and the rules read from them: whether what is known settles the step a restore takes, and
why no step can be restored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from snapd.daemon.whole_snapshots import Copy
from snapd.errors import FormatError, SnapdError
from snapd.format.global_manifest import GlobalManifest, global_id, parse_any
from snapd.format.manifest import taken_of

log = logging.getLogger(__name__)

SPEED = {"local": 0, "memory": 1, "disk": 2, "remote": 4}  # the order sources are tried in
MAX_WORLD_SIZE = 1 << 20  # (a peer's brief answer naming more ranks is left out)


def _speed(where: object) -> int:
    """Where a peer says it holds a part (``disk``, ``memory``), as a place in the order of sources."""
    return SPEED.get(where, 3) if isinstance(where, str) else 3


def _taken(v: object) -> float:
    """A peer's ``taken`` time of a snapshot, or 0 (oldest) where it is not a finite number."""
    try:
        t = float(v) if type(v) in (int, float) else 0.0  # type: ignore[arg-type]
    except OverflowError:
        return 0.0
    return t if math.isfinite(t) else 0.0


@dataclass
class Step:
    step: int
    sources: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # rank -> [(speed, endpoint)]
    whole: list[Copy] = field(default_factory=list)  # a single process's snapshot of this step
    # the step committed as a global snapshot, as the first node that named it has it: its world size
    # (0: none named), when it was taken, its manifest's identity (xxh3_64 of its bytes), who named it
    world_size: int = 0
    taken: float = 0.0
    id: str = ""
    named_by: list[str] = field(default_factory=list)
    raw: bytes | None = None  # its manifest, where it came whole (this node's disk, a peer's, the bucket)

    def name(self, m: GlobalManifest, raw: bytes, where: str) -> None:
        """The step's global manifest ``m`` (``raw``), from ``where``."""
        self.world_size, self.taken, self.id = m.world_size, taken_of(m), global_id(raw)
        self.named_by, self.raw = [where], raw


def fold(steps: dict[int, Step], endpoint: str, job: str, reply: dict | SnapdError) -> None:
    """A peer's answer to ``have``: the steps it holds (their global manifests, its rank parts
    or a single process's copies), added to ``steps``."""
    if isinstance(reply, SnapdError):
        return
    have = reply.get("steps")
    for entry in have if isinstance(have, list) else []:
        if not (isinstance(entry, dict) and type(entry.get("step")) is int):
            continue
        s = steps.setdefault(entry["step"], Step(entry["step"]))
        if isinstance(entry.get("whole"), str) and isinstance(entry.get("parts"), dict):
            s.whole.append(Copy(_speed(entry["parts"].get("0")), endpoint, entry["whole"],
                                _taken(entry.get("taken"))))
            continue
        named, full = entry.get("named"), entry.get("global")
        if isinstance(full, str) and full:  # (whole: a daemon before brief answers)
            raw = full.encode()
            if s.world_size and global_id(raw) == s.id:
                s.named_by.append(endpoint)
                s.raw = raw
            elif not s.world_size:
                try:
                    m = parse_any(raw, f"{endpoint}: {job} step {s.step}")
                except FormatError as e:
                    log.warning("%s", e)
                    continue
                if isinstance(m, GlobalManifest) and m.step == s.step:
                    s.name(m, raw, endpoint)
        elif isinstance(named, dict):  # (briefly: brought from one of them if it is taken)
            w, taken, id_ = named.get("world_size"), named.get("taken"), named.get("id")
            if s.world_size and id_ == s.id:
                s.named_by.append(endpoint)
            elif not s.world_size and type(w) is int and 1 <= w <= MAX_WORLD_SIZE and \
                    isinstance(id_, str) and len(id_) <= 64:
                s.world_size, s.taken, s.id, s.named_by = w, _taken(taken), id_, [endpoint]
        for r, where in entry.get("parts", {}).items():
            if isinstance(r, str) and r.isdigit():
                s.sources.setdefault(int(r), []).append((_speed(where), endpoint))


def forget_removed(steps: dict[int, Step], removed: dict[int, float]) -> None:
    """Leave out of ``steps`` the copies of snapshots a user removed on this node (the job's index
    says which, with when each was taken: snapd.format.retention.remove_step): a restore must not
    bring them back from a peer or the bucket. A step made again since, taken later, stays."""
    for n, t in removed.items():
        s = steps.get(n)
        if s is None:
            continue
        s.whole = [c for c in s.whole if c.taken > t + 1e-6]
        if s.world_size and s.taken <= t + 1e-6 or not s.world_size and not s.whole:
            del steps[n]  # (its parts are that making's: a part carries no time of its own)


def settled(steps: dict[int, Step], want: int | None) -> bool:
    """Whether what is known of ``steps`` settles what a restore takes, the peers yet to answer
    aside: step ``want`` with each of its parts somewhere; or, for the newest, that the newest
    committed step anyone named (taken last) has every part somewhere. Until then, a peer not
    heard from may hold the part that completes a newer step, and is waited for (a restore must not
    take an older step for want of it). A step only its parts are known of (its global manifest
    nowhere yet) is not one a restore can take, and does not count."""
    def whole(s: Step) -> bool:
        return bool(s.whole) or bool(s.world_size) and all(s.sources.get(r) for r in range(s.world_size))

    def taken(s: Step) -> tuple[float, int]:  # (as part_fetch.locate and newest_first order them)
        return (s.taken if s.world_size else max(c.taken for c in s.whole), s.step)

    if want is not None:
        return want in steps and whole(steps[want])
    named = [s for s in steps.values() if s.world_size or s.whole]
    return bool(named) and whole(max(named, key=taken))


def missing(steps: dict[int, Step], want: int | None) -> str:
    """Why no step can be restored, for the client's error: the newest steps known and the ranks
    whose parts no node that answered holds (a lost node's part never replicated, say)."""
    known = sorted((s for s in steps.values() if s.world_size and want in (None, s.step)),
                   key=lambda s: s.taken, reverse=True)[:3]
    if not known:
        return f"no node that answered knows step {want} of the job" if want is not None else \
            "no node that answered holds a committed step of the job"
    lines = []
    for s in known:
        lost = [r for r in range(s.world_size) if not s.sources.get(r)]
        more = f" and {len(lost) - 16} more" if len(lost) > 16 else ""  # (a world size of 100k: not all)
        lines.append(f"step {s.step}: rank(s) {lost[:16]}{more}'s part(s) on no node that answered")
    return "; ".join(lines)
