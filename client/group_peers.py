"""The job's daemons found through its own ``torch.distributed`` group, or listed by the job
(``connect(peers=[...])``), told to this rank's daemon (docs/peers.md).

A daemon with peers (``peer_endpoint``) tells each client that says hello the endpoint its peers
reach it at. On a job of several ranks in an initialized process group, each rank writes that
endpoint in the group's store (the key-value store every rank already reached at
``init_process_group``: torchrun's, or the one ``init_method`` names), and reads the others' as they
come, on a thread of its own; it tells its daemon (``peers``) those found at connect, then all of
them once every rank has written its own. The daemons of a job thus find each other with no list,
shared directory or bucket, and a replacement node's daemon learns the job's others from its rank.

No collective is made: ``connect()`` writes one key and reads those there, and a rank that never
connects delays nothing but this thread (which gives up after ``WAIT_S``). Store calls are short
(``check``, ``get`` of keys known to be set, ``add``), never a blocking ``wait``: a store's client
serialises its calls, and the trainer's own must not queue behind ours. Keys carry the job and the
run id (client/ranks.py), so a restarted run never reads the endpoints of the run before it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from snapd.errors import InvalidArgument, SnapdError

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the thread looks for entries not read yet, while ranks connect
FAST_S = 10.0  # after this long with no new entry, it looks less often: doubling up to MAX_POLL_S
MAX_POLL_S = 5.0  # (a rank that never connects, say one that does not use snapd, must not keep every
# other rank reading the store five times a second for WAIT_S: the trainer's own calls queue there)
WAIT_S = 600.0  # how long it looks before giving up on ranks that never connect
RESTORE_WAIT_S = 60.0  # how long a restore waits for every rank's entry (a replacement's ranks start late)
SNAPSHOT_WAIT_S = 5.0  # how long the first snapshot waits for them (its replicas go where they say)


def group_store(rank: int, world_size: int) -> Any | None:
    """The store of the default process group, where one is initialized (torch already imported)
    and this process is rank ``rank`` of ``world_size`` in it."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        return None  # (the job's ranks are not the group's: it is not the job's meeting place)
    try:
        return dist.PrefixStore("snapd-peers", dist.distributed_c10d._get_default_store())
    except (AttributeError, RuntimeError, ValueError) as e:  # (a torch without it: the daemon's own peers)
        log.info("the process group's store is not reachable (%s): peers come from the daemon's config", e)
        return None


def find(conn: Any, job: str, run: str, rank: int, world_size: int, own: dict | None) -> GroupPeers | None:
    """This rank's entry written and the others' looked for, where the job's ranks form the initialized
    process group (None where they do not, yet: a client made before ``init_process_group`` looks
    again at its next snapshot or restore)."""
    store = group_store(rank, world_size) if world_size > 1 else None
    if store is None:
        return None
    group = GroupPeers(store, job, run, rank, world_size, own, conn)
    try:
        group.start()
    except Exception as e:  # (a group whose store fails: the daemons' own peers still serve)
        log.warning("the job's daemons could not be found through its process group: %s", e)
        group.complete.set()  # (nothing waits on it, and it is not tried again)
    return group


class GroupPeers:
    """This rank's entry in the group's store, and the thread that reads the other ranks'."""

    def __init__(self, store: Any, job: str, run: str, rank: int, world_size: int, own: dict | None,
                 conn: Any) -> None:
        self.store, self.rank, self.world_size, self.own = store, rank, world_size, own
        self.conn = conn  # (snapd.client.connection.Connection: its calls may come from any thread)
        self.prefix = f"{job}/{run}/"
        self.found: dict[str, dict] = {}  # endpoint -> {endpoint, node}
        self.complete = threading.Event()  # every rank's entry was read and told (or it gave up)
        self._read: set[int] = set()  # the entries read (e1 .. en, in the order ranks wrote them)
        self._ranks: set[int] = set()  # the ranks whose entry was read
        self._stop = threading.Event()
        self._told: tuple[list[dict], bool] | None = None
        self._waited_out = False

    def start(self) -> None:
        """Write this rank's entry, tell the daemon those already there, and read the rest on a
        thread (only where this rank's daemon has peers: another rank's may have, and wants ours)."""
        at = self.store.add(self.prefix + "n", 1)
        self.store.set(f"{self.prefix}e{at}", json.dumps({**(self.own or {}), "rank": self.rank}))
        if self.own is None:
            self.complete.set()
            return
        self._pass()
        if not self.complete.is_set():
            threading.Thread(target=self._loop, name="snapd-group-peers", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout_s: float, why: str) -> None:
        """Wait up to ``timeout_s`` for every rank's entry (``why``: what waits, for the log); once
        a wait has ended without them, later ones do not wait (each snapshot would)."""
        if self.complete.is_set() or self._waited_out:
            return
        if not self.complete.wait(timeout_s):
            self._waited_out = True
            log.warning("%s goes on with %d of %d ranks' daemons known: the others have not connected "
                        "within %.0f s", why, len(self._ranks), self.world_size, timeout_s)

    def tell(self, peers: list[dict], complete: bool) -> None:
        """Tell the daemon the job's daemons found (a failure is logged: the daemon keeps its own)."""
        self._told = (peers, complete)
        try:
            self.conn.call("peers", peers=peers, complete=complete)
        except (SnapdError, TimeoutError) as e:
            log.warning("the daemon was not told the job's other daemons: %s", e)

    def tell_again(self) -> None:
        """A restarted daemon forgot what this rank told the one before."""
        if self._told is not None:
            self.tell(*self._told)

    def _loop(self) -> None:
        start = time.monotonic()
        deadline, interval = start + WAIT_S, POLL_S
        try:
            while not self._stop.wait(interval):
                if self._pass():
                    interval = POLL_S
                elif time.monotonic() - start > FAST_S:
                    interval = min(MAX_POLL_S, interval * 2)
                if self.complete.is_set():
                    return
                if time.monotonic() > deadline:
                    log.warning("%d of %d ranks wrote their daemon's endpoint in %.0f s; the peers are "
                                "those found", len(self._ranks), self.world_size, WAIT_S)
                    return
        except Exception as e:  # (the group destroyed, its store gone: the daemon keeps what it was told)
            log.info("reading the job's peers from the process group's store ended: %s", e)
        finally:
            self.complete.set()

    def _pass(self) -> bool:
        """Read the entries written since the last pass; tell the daemon if any endpoint is new, and
        once every rank's entry is read. Whether there was any entry to read."""
        def key(i: int) -> str:
            return f"{self.prefix}e{i}"

        n = self.store.add(self.prefix + "n", 0)
        # (an entry counted but not yet set, or never: its writer died between, is looked for again)
        ready = [i for i in range(1, n + 1) if i not in self._read and self.store.check([key(i)])]
        new = False
        for i, raw in zip(ready, self.store.multi_get([key(i) for i in ready]) if ready else []):
            self._read.add(i)
            try:
                entry = json.loads(bytes(raw))
            except ValueError:
                continue
            if not isinstance(entry, dict) or type(entry.get("rank")) is not int \
                    or not 0 <= entry["rank"] < self.world_size:
                continue
            self._ranks.add(entry["rank"])  # (a rank that connected twice wrote twice)
            if isinstance(entry.get("endpoint"), str) and entry["endpoint"] not in self.found:
                self.found[entry["endpoint"]] = {"endpoint": entry["endpoint"],
                                                 "node": str(entry.get("node", ""))[:128]}
                new = True
        done = len(self._ranks) >= self.world_size
        if new or done:
            self.tell(sorted(self.found.values(), key=lambda p: p["endpoint"]), done)
        if done:
            self.complete.set()
        return bool(ready)


class ListedPeers:
    """The job's daemons as ``connect(peers=)`` lists them: told at connect (an error there is the
    caller's: raised), and again to a restarted daemon. The process group is then not asked."""

    def __init__(self, conn: Any, endpoints: list[str]) -> None:
        self.conn = conn
        self.peers = [{"endpoint": e} for e in endpoints]

    def start(self) -> None:
        self.conn.call("peers", peers=self.peers, complete=True)

    def wait(self, timeout_s: float, why: str) -> None:
        pass  # (known from the start)

    def tell_again(self) -> None:
        try:
            self.start()
        except (SnapdError, TimeoutError) as e:
            log.warning("the daemon was not told the job's other daemons: %s", e)

    def stop(self) -> None:
        pass


def check_listed(peers: object) -> list[str] | None:
    """``connect(peers=)``: None, or a list of at most 1024 ``tcp://HOST:PORT`` strings (the daemon
    checks each is an address to reach)."""
    if peers is None:
        return None
    if isinstance(peers, str) or not isinstance(peers, (list, tuple)) or len(peers) > 1024 or \
            not all(isinstance(e, str) and e.startswith("tcp://") for e in peers):
        raise InvalidArgument(f"peers must be a list of at most 1024 'tcp://HOST:PORT' endpoints (the job's "
                              f"other daemons), got {peers!r:.200}")
    return list(peers)
