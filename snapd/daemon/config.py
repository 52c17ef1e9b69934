"""The daemon's settings: one frozen dataclass, validated on construction.

Only ``from_sources`` reads the environment and the config file; precedence
is defaults < file (``/etc/snapd-ckpt/snapd.toml``, or ``--config``) <
``SNAPD_<FIELD>`` environment < command-line flags. Tests build a
DaemonConfig directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from snapd.daemon import config_sources
from snapd.daemon.host_memory import MIB, default_host_buffer_bytes, default_host_memory_bytes
from snapd.errors import InvalidArgument
from snapd.format.chunks import CODECS
from snapd.paths import check_endpoint, default_endpoint, default_root


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    root: Path
    endpoint: str
    host_buffer_bytes: int  # each buffer's size at start
    host_buffers: int = 2
    # a snapshot larger than a buffer grows it up to this; None: never. Clients that snapshot at
    # once get more buffers, all of them together up to max_host_memory_bytes; None: never. Both
    # go back to the starting ones when no client is left (``from_sources`` sets the defaults:
    # snapd.daemon.host_memory)
    max_host_buffer_bytes: int | None = None
    max_host_memory_bytes: int | None = None
    encode_threads: int = max(1, min(8, (os.cpu_count() or 2)))
    chunk_bytes: int = 4 * MIB
    codec: str = "auto"
    # on: a chunk unchanged since the job's previous snapshot is not written again, the earlier
    # snapshot's data file is hard-linked instead (snapd.format.incremental); off: every byte written
    incremental: str = "on"
    drain_timeout_s: float = 120.0
    # how long a rank's durable part waits for the other ranks' parts of its step before the step is
    # given up (snapd.daemon.rank_commits); a rank slower than this by more fails its step
    commit_timeout_s: float = 300.0
    exit_when_idle_s: float | None = None
    shm_dir: Path = Path("/dev/shm")
    client_check_interval_s: float = 2.0
    metrics_addr: str | None = None  # IP:PORT for Prometheus; off by default
    backend: str = "auto"  # kernels: auto (CUDA when CuPy and a device are present) | cuda | cpu
    # who may connect (snapd.daemon.access): the socket's group, and the users and
    # groups allowed besides the daemon's own uid and root
    socket_group: str = "snapd-ckpt"  # "" = the daemon's uid only; this default is dropped if no such group
    allowed_users: tuple[str, ...] = ()  # names or numeric uids
    allowed_groups: tuple[str, ...] | None = None  # names or gids; None = the socket group
    user_dirs: str = "auto"  # <root>/<user>/<job>: on | off | auto (on when other uids may connect)
    client_buffer_bytes: int | None = None  # host-buffer bytes one client may hold at once (whole buffers)
    # host-buffer bytes all clients of one uid may hold at once; None: half of max_host_memory_bytes
    # when other users may connect (one user's many connections cannot take every buffer), else none
    user_buffer_bytes: int | None = None
    # bytes each user's snapshots may take under the root, with those in flight (snapd.daemon.quotas);
    # None: half the root's filesystem when other users may connect, else no quota
    user_disk_bytes: int | None = None
    # snapshots one client may have between acquire and persisted (an emergency one may pass it by
    # one), so one client cannot take every buffer from the others while a burst still runs on
    client_max_in_flight: int | None = 4
    busy_wait_s: float = 120.0  # the longest a snapshot waits for a host buffer before it is refused as busy
    # the remote tier (snapd.daemon.uploads): s3://bucket[/prefix], uploaded to once a snapshot is
    # committed locally; None: none. endpoint_url: an S3-compatible store that is not AWS (else
    # AWS_ENDPOINT_URL, else AWS's). Credentials: the standard AWS environment and files only.
    remote: str | None = None
    endpoint_url: str | None = None
    remote_keep_last: int | None = None  # remote retention (None: keep every snapshot uploaded)
    remote_keep_every_steps: int | None = None
    # snapshots waiting for upload at most: past it the oldest (never the best, nor an emergency
    # one) is skipped with a log line, and its local copy no longer waits for it
    remote_backlog: int = 4
    remote_bytes_per_s: int | None = None  # bandwidth bound of the uploads (None: none)
    remote_threads: int = 4  # parts in flight (memory: remote_threads x 16 MiB)
    # peer replicas (snapd.daemon.peers, docs/peers.md): this daemon's address for the other nodes'
    # daemons (tcp://HOST:PORT, bound as given; None: no peers), theirs (a list, and/or a directory
    # every node mounts where each daemon writes its own), the CurveZMQ key directory (`snapd
    # peer-keys`), this node's name (default: the host name), how many other nodes hold a copy of each
    # rank part, the memory those copies may take here (None: a quarter of the node's) and a
    # directory for what does not fit (None: refused)
    peer_endpoint: str | None = None
    peers: tuple[str, ...] = ()
    peer_directory: Path | None = None
    peer_keys: Path | None = None
    node_name: str = ""
    replicas: int = 1
    replica_memory_bytes: int | None = None
    replica_dir: Path | None = None
    peer_bytes_per_s: int | None = None  # bandwidth bound of replication (None: none)
    peer_timeout_s: float = 10.0  # a peer that does not answer within this is down for now
    peer_check_s: float = 30.0  # how often an idle replica holder is asked whether it still holds its copies

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoint", check_endpoint(self.endpoint))
        self._check_memory()
        self._check_choices()
        self._check_limits()

    def _check_memory(self) -> None:
        if self.host_buffers < 2:
            raise InvalidArgument("host_buffers must be at least 2 (a double buffer), got "
                                  f"{self.host_buffers}")
        if self.host_buffer_bytes < MIB:
            raise InvalidArgument(f"host_buffer_bytes must be at least 1 MiB, got {self.host_buffer_bytes}")
        if self.max_host_buffer_bytes is not None and self.max_host_buffer_bytes < self.host_buffer_bytes:
            raise InvalidArgument(f"max_host_buffer_bytes ({self.max_host_buffer_bytes}) is less than "
                                  f"host_buffer_bytes ({self.host_buffer_bytes})")
        if self.max_host_memory_bytes is not None and \
                self.max_host_memory_bytes < max(self.host_buffers * self.host_buffer_bytes, self.buffer_cap):
            raise InvalidArgument(f"max_host_memory_bytes ({self.max_host_memory_bytes}) is less than the "
                                  f"starting buffers ({self.host_buffers} x {self.host_buffer_bytes}) or one "
                                  f"buffer at max_host_buffer_bytes ({self.buffer_cap})")

    def _check_choices(self) -> None:
        if not 1 <= self.encode_threads <= 64:
            raise InvalidArgument(f"encode_threads must be 1..64, got {self.encode_threads}")
        if self.chunk_bytes < 64 << 10 or self.chunk_bytes > 64 * MIB or self.chunk_bytes % 16:
            raise InvalidArgument("chunk_bytes must be 64 KiB..64 MiB and a multiple of 16, got "
                                  f"{self.chunk_bytes}")
        if self.codec != "auto" and self.codec not in CODECS:
            raise InvalidArgument(f"codec must be auto or one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.metrics_addr is not None:
            from snapd.daemon.metrics import parse_addr

            parse_addr(self.metrics_addr)
        if self.backend not in ("auto", "cuda", "cpu"):
            raise InvalidArgument(f"backend must be auto, cuda or cpu, got {self.backend!r}")
        if self.incremental not in ("on", "off"):
            raise InvalidArgument(f"incremental must be on or off, got {self.incremental!r}")
        if self.user_dirs not in ("auto", "on", "off"):
            raise InvalidArgument(f"user_dirs must be auto, on or off, got {self.user_dirs!r}")
        for name in ("allowed_users", "allowed_groups"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, tuple) or not all(isinstance(x, str) and x for x in v)):
                raise InvalidArgument(f"{name} must be a list of names or numeric ids, got {v!r}")

    def _check_limits(self) -> None:
        if self.client_buffer_bytes is not None and self.client_buffer_bytes < self.host_buffer_bytes:
            raise InvalidArgument(f"client_buffer_bytes ({self.client_buffer_bytes}) is less than one host "
                                  f"buffer ({self.host_buffer_bytes}): no client could snapshot")
        if self.user_buffer_bytes is not None and self.user_buffer_bytes < self.host_buffer_bytes:
            raise InvalidArgument(f"user_buffer_bytes ({self.user_buffer_bytes}) is less than one host "
                                  f"buffer ({self.host_buffer_bytes}): no user could snapshot")
        if self.user_disk_bytes is not None and self.user_disk_bytes < 1:
            raise InvalidArgument(f"user_disk_bytes must be >= 1, got {self.user_disk_bytes}")
        if self.client_max_in_flight is not None and self.client_max_in_flight < 1:
            raise InvalidArgument(f"client_max_in_flight must be >= 1, got {self.client_max_in_flight}")
        if not self.busy_wait_s > 0:
            raise InvalidArgument(f"busy_wait_s must be > 0, got {self.busy_wait_s}")
        if self.commit_timeout_s <= 0:
            raise InvalidArgument(f"commit_timeout_s must be > 0, got {self.commit_timeout_s}")
        if self.drain_timeout_s <= 0:
            raise InvalidArgument(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")
        if self.exit_when_idle_s is not None and self.exit_when_idle_s <= 0:
            raise InvalidArgument(f"exit_when_idle_s must be > 0, got {self.exit_when_idle_s}")
        self._check_remote()

    def _check_remote(self) -> None:
        if self.remote is not None:
            from snapd.remote.store import parse_url

            parse_url(self.remote)
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise InvalidArgument(f"endpoint_url must be an http:// or https:// URL, got "
                                  f"{self.endpoint_url!r}")
        for name in ("remote_keep_last", "remote_keep_every_steps", "remote_bytes_per_s"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InvalidArgument(f"{name} must be None or >= 1, got {v}")
        if self.remote_backlog < 1:
            raise InvalidArgument(f"remote_backlog must be >= 1, got {self.remote_backlog}")
        if not 1 <= self.remote_threads <= 64:
            raise InvalidArgument(f"remote_threads must be 1..64, got {self.remote_threads}")
        self._check_peers()

    def _check_peers(self) -> None:
        for name in ("peer_directory", "peer_keys", "replica_dir"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.peer_endpoint is None:
            if self.peers or self.peer_directory is not None:
                raise InvalidArgument("peers or peer_directory is set but peer_endpoint is not: set this "
                                      "daemon's own address for its peers (tcp://HOST:PORT)")
            return
        from snapd.peers.wire import check_endpoint

        check_endpoint(self.peer_endpoint)
        for p in self.peers:
            check_endpoint(p)
        if self.peer_keys is None:
            raise InvalidArgument("peer_endpoint is set but peer_keys is not: daemons on other nodes must "
                                  "authenticate (make a key directory with `snapd peer-keys DIR`)")
        if not 0 <= self.replicas <= 8:
            raise InvalidArgument(f"replicas must be 0..8, got {self.replicas}")
        for name in ("replica_memory_bytes", "peer_bytes_per_s"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InvalidArgument(f"{name} must be None or >= 0, got {v}")
        if not self.peer_timeout_s > 0:
            raise InvalidArgument(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if not 0.1 <= self.peer_check_s <= 86400:
            raise InvalidArgument(f"peer_check_s must be in [0.1, 86400] seconds, got {self.peer_check_s}")

    @property
    def buffer_cap(self) -> int:
        """The largest a host buffer may become (the largest snapshot the daemon takes)."""
        return self.max_host_buffer_bytes or self.host_buffer_bytes

    @property
    def memory_cap(self) -> int:
        """The most all host buffers together may take."""
        return self.max_host_memory_bytes or self.host_buffers * self.buffer_cap

    @classmethod
    def from_sources(cls, flags: dict[str, Any], env: dict[str, str] | None = None,
                     config_file: str | os.PathLike | None = None) -> DaemonConfig:
        """Defaults < config file < ``SNAPD_<FIELD>`` environment < flags (None = not given)."""
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get("SNAPD_CONFIG")
        if path is None and config_sources.DEFAULT.exists():
            path = config_sources.DEFAULT
        known = {f.name: str(f.type) for f in fields(cls)}
        if path is not None:
            values.update(config_sources.read(Path(path), known))
        for name, typ in known.items():
            raw = env.get(f"SNAPD_{name.upper()}")
            if raw is not None:
                values[name] = config_sources.convert(name, raw, typ)
        values.update({k: v for k, v in flags.items() if v is not None})
        values.setdefault("root", default_root())
        values.setdefault("endpoint", default_endpoint())
        values.setdefault("host_buffer_bytes", default_host_buffer_bytes())
        values["root"] = Path(values["root"])
        values["shm_dir"] = Path(values.get("shm_dir", "/dev/shm"))
        count, start = values.get("host_buffers", 2), values["host_buffer_bytes"]
        if isinstance(count, int) and count >= 2 and isinstance(start, int):
            values.setdefault("max_host_memory_bytes",
                              max(count * start, default_host_memory_bytes(values["shm_dir"])))
            if isinstance(values["max_host_memory_bytes"], int):
                values.setdefault("max_host_buffer_bytes",
                                  max(start, values["max_host_memory_bytes"] // count // MIB * MIB))
        for name in ("allowed_users", "allowed_groups", "peers"):
            if isinstance(values.get(name), list):
                values[name] = tuple(str(x) for x in values[name])
        return cls(**values)

    def to_toml(self) -> str:
        """The effective configuration, as a config file would say it."""
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                lines.append(f"# {f.name} is unset")
            elif isinstance(v, tuple):
                lines.append(f"{f.name} = {json.dumps(list(v))}")  # a JSON string array is TOML too
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"{f.name} = {v}")
            else:
                lines.append(f'{f.name} = "{v}"')
        return "\n".join(lines)
