"""A job's snapshots in the remote tier: ``<prefix>/<job>/step-<N>/`` holds the same files as the
local snapshot directory, and its ``manifest.json`` object is the commit, written after every
object it names (docs/FORMAT.md section 8). A reader lists only steps whose manifest is there, so it never
sees a snapshot whose objects are not all uploaded; a replaced or deleted snapshot loses its
manifest first.

A global snapshot (a job on several ranks) is uploaded part by part, each node its own ranks'
parts (``rank-NNNNN/``, each committed by its own manifest object); whichever node then finds
every part's manifest there, each the part the global manifest names, writes the global manifest.
Two nodes may both do so: they write the same bytes (the one global manifest of the local commit,
snapd.format.global_commit), so no lock is needed; by S3's read-after-write order the node whose
parts came last always sees them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from snapd.errors import FormatError, RemoteError
from snapd import __version__
from snapd.format.global_manifest import GlobalManifest, assemble, parse_any, part_dir
from snapd.format.index import Entry
from snapd.format.jobdir import SNAPSHOT_RE, read_regular, snapshot_name
from snapd.format.manifest import MANIFEST_NAME, Manifest, parse
from snapd.remote.store import Store

log = logging.getLogger(__name__)

Pace = Callable[[int], None]


class RemoteJob:
    def __init__(self, store: Store, job: str) -> None:
        self.store, self.job = store, job

    def key(self, *parts: str) -> str:
        return self.store.key(self.job, *parts)

    def where(self, name: str = "") -> str:
        return self.store.where(self.key(name))

    # -- what is there -----------------------------------------------------------------------
    def steps(self) -> dict[int, str]:
        """The committed snapshots: step -> name (those whose manifest object is there)."""
        out = {}
        base = self.key("")
        for key in self.store.list(base + "/" if base else ""):
            rest = key[len(base) + 1 if base else 0:].split("/")
            if len(rest) == 2 and rest[1] == MANIFEST_NAME and (m := SNAPSHOT_RE.match(rest[0])):
                out[int(m.group(1))] = rest[0]
        return out

    def manifest_bytes(self, name: str) -> bytes | None:
        return self.store.get(self.key(name, MANIFEST_NAME))

    def entries(self) -> tuple[list[Entry], tuple[str, str] | None]:
        """Every committed snapshot's index entry (from its manifest), and the job's best rule."""
        entries, rule = [], None
        for name in self.steps().values():
            raw = self.manifest_bytes(name)
            try:
                m = parse_any(raw, self.where(f"{name}/{MANIFEST_NAME}")) if raw is not None else None
            except FormatError as e:
                log.warning("%s: %s", self.where(name), e)
                continue
            if m is not None:
                entries.append(Entry.of(m))
                rule = m.best_metric or rule
        return entries, rule

    # -- upload ------------------------------------------------------------------------------
    def upload(self, path: Path, ranks: list[int] | None, pool: Executor, pace: Pace | None = None) -> bool:
        """Upload the committed local snapshot ``path`` (a global one: the parts of ``ranks``, all
        when None). True once the remote snapshot is committed; False while a global one waits for
        other nodes' parts."""
        raw = read_regular(path / MANIFEST_NAME)
        manifest = parse_any(raw, str(path / MANIFEST_NAME))
        name = path.name
        remote = self.manifest_bytes(name)
        if remote == raw:
            return True
        if remote is not None:  # another version of this step: uncommit it before its objects change
            self.store.delete([self.key(name, MANIFEST_NAME)])
        if not isinstance(manifest, GlobalManifest):
            self._upload_dir(path, name, raw, pool, pace)
            return True
        for r in range(manifest.world_size) if ranks is None else ranks:
            part = path / part_dir(r)
            self._upload_dir(part, f"{name}/{part_dir(r)}", read_regular(part / MANIFEST_NAME), pool, pace)
        return self.commit_global(name, manifest, raw, pool)

    def _upload_dir(self, path: Path, name: str, raw: bytes, pool: Executor, pace: Pace | None) -> None:
        """One snapshot directory (or rank part): its data objects, then its manifest."""
        mkey = self.key(name, MANIFEST_NAME)
        remote = self.store.get(mkey)
        if remote == raw:
            return
        if remote is not None:
            self.store.delete([mkey])
        for info in parse(raw, str(path / MANIFEST_NAME)).files:
            self.store.upload_file(self.key(name, info["name"]), str(path / info["name"]), info["bytes"],
                                   pool, pace)
        if read_regular(path / MANIFEST_NAME) != raw:  # the step saved anew meanwhile: its files changed
            raise RemoteError(f"{path} was replaced by a newer version of its step while it was uploaded; "
                              "not committed (the newer one is uploaded instead)")
        if pace is not None:
            pace(len(raw))
        self.store.put(mkey, raw)

    def _parts(self, name: str, world: int, pool: Executor) -> list[Manifest] | None:
        """Every rank's part manifest of ``name`` in the bucket, parsed; None while one is missing
        or damaged."""
        keys = self.store.list(self.key(name) + "/")
        want = [self.key(name, part_dir(r), MANIFEST_NAME) for r in range(world)]
        if any(k not in keys for k in want):
            return None
        raws = list(pool.map(self.store.get, want))
        try:
            parts = [parse(raw, self.store.where(k)) for raw, k in zip(raws, want) if raw is not None]
        except FormatError as e:
            log.warning("%s: a part is damaged (%s): not committed", self.where(name), e)
            return None
        return parts if len(parts) == world else None

    def commit_global(self, name: str, manifest: GlobalManifest, raw: bytes, pool: Executor) -> bool:
        """Write the global manifest if every part the manifest names is committed remotely."""
        parts = self._parts(name, manifest.world_size, pool)
        if parts is None or [p.checksum for p in parts] != [p["checksum"] for p in manifest.parts]:
            return False  # (a part of another version of this step: its node uploads the right one)
        self.store.put(self.key(name, MANIFEST_NAME), raw)
        return True

    def upload_part(self, src: Path, name: str, rank: int, pool: Executor, pace: Pace | None = None) -> None:
        """A rank's part still waiting for its global snapshot (``src``: its directory in the
        pending directory), uploaded ahead of the commit: nodes that share no filesystem meet here."""
        self._upload_dir(src, f"{name}/{part_dir(rank)}", read_regular(src / MANIFEST_NAME), pool, pace)

    def commit_parts(self, name: str, step: int, world: int, run: str, pool: Executor) -> bool:
        """Commit a global snapshot from the parts in the bucket, once every rank's is there and all
        are of this step, world size and run: the global manifest assembled from them (as a local
        commit would), written last. True when the snapshot is committed (by this call or before)."""
        parts = self._parts(name, world, pool)
        if parts is None or any(p.step != step or not p.part or p.part.get("run") != run or
                                p.part.get("world_size") != world for p in parts):
            return False  # (parts of another run or world size: their nodes upload this run's)
        sums = [p.checksum for p in parts]
        have = self.manifest_bytes(name)
        try:
            old = parse_any(have) if have is not None else None
        except FormatError:
            old = None
        if isinstance(old, GlobalManifest) and [p["checksum"] for p in old.parts] == sums:
            return True
        try:
            manifest = assemble(parts, f"snapd {__version__}", time.time())
        except FormatError as e:
            log.warning("%s: the ranks' parts disagree (%s): not committed", self.where(name), e)
            return False
        self.store.put(self.key(name, MANIFEST_NAME), manifest.to_bytes())
        log.info("%s: committed in the bucket from the parts of %d ranks", self.where(name), world)
        return True

    def has_part(self, name: str, rank: int, checksum: str) -> bool:
        """Whether the committed global snapshot ``name`` holds this part of ``rank``."""
        raw = self.manifest_bytes(name)
        try:
            m = parse_any(raw) if raw is not None else None
        except FormatError:
            return False
        return isinstance(m, GlobalManifest) and rank < m.world_size and m.parts[rank]["checksum"] == checksum

    # -- delete ------------------------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Uncommit first (the manifest), then the objects."""
        name = snapshot_name(step)
        self.store.delete([self.key(name, MANIFEST_NAME)])
        rest = list(self.store.list(self.key(name) + "/"))
        manifests = [k for k in rest if k.endswith("/" + MANIFEST_NAME)]
        for batch in (manifests, [k for k in rest if k not in set(manifests)]):  # no torn part is listed
            if batch:
                self.store.delete(batch)
