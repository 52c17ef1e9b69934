"""What the server knows of each client: its session, the shared-memory
regions it registered (the registered path), and where the tensors of its
snapshot message lie.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snapd.errors import ProtocolError
from snapd.format.tree import TensorLeaf
from snapd.format.writer import Retention

REGION_RE = re.compile(r"^snapd-client-(\d+)-[0-9a-f]+$")


@dataclass
class Region:
    """A client's registered shared-memory region, mapped read-only."""

    path: str
    mm: mmap.mmap
    view: np.ndarray


@dataclass
class Session:
    peer: bytes
    job: str
    pid: int  # from SO_PEERCRED, like uid: the kernel's word, not the client's
    uid: int
    jobs_root: Path  # where this client's jobs live: the root, or the root's per-user directory
    retention: Retention
    on_busy: str
    leases: set[int] = field(default_factory=set)  # buffers granted, snapshot not yet sent
    regions: dict[int, Region] = field(default_factory=dict)


def open_region(path: str, nbytes: int, pid: int, uid: int, shm_dir: Path) -> Region:
    """Map a client's region read-only, after checking it is that client's:
    named for its pid, directly under ``shm_dir``, owned by its uid, of the
    announced size."""
    m = REGION_RE.match(os.path.basename(path))
    if os.path.dirname(path) != str(shm_dir) or not m or int(m.group(1)) != pid:
        raise ProtocolError(f"{path}: not a region of client pid {pid} under {shm_dir}", "bad_region")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        hint = " (the client must grant the daemon's uid read access)" if e.errno == 13 else ""
        raise ProtocolError(f"{path}: cannot open: {e.strerror}{hint}", "bad_region") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != uid or st.st_size != nbytes:
            raise ProtocolError(f"{path}: not owned by the client or not {nbytes} bytes", "bad_region")
        mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    return Region(path, mm, np.frombuffer(mm, dtype=np.uint8))


def place_tensors(tensors: list[dict], buf: np.ndarray, regions: dict[int, Region], devices: set[str]
                  ) -> tuple[list[TensorLeaf], list[tuple[np.ndarray, np.ndarray]], list[tuple[TensorLeaf, dict]]]:
    """The leaves of a ``snapshot`` message over the leased buffer ``buf``, the copies the daemon
    must make from registered regions (region bytes -> buffer), and the tensors it must copy from
    GPUs (leaf, `cuda` descriptor). Every range is checked."""
    leaves, copies, on_gpu = [], [], []
    for t in tensors:
        if t["offset"] + t["nbytes"] > buf.size:
            raise ProtocolError(f"{t['key']}: bytes {t['offset']}..{t['offset'] + t['nbytes']} lie "
                                f"outside the {buf.size}-byte buffer", "bad_field")
        dst = buf[t["offset"]:t["offset"] + t["nbytes"]]
        if "region" in t:
            region = regions.get(t["region"])
            if region is None or t["region_offset"] + t["nbytes"] > region.view.size:
                raise ProtocolError(f"{t['key']}: not inside a region this client registered", "bad_region")
            copies.append((dst, region.view[t["region_offset"]:t["region_offset"] + t["nbytes"]]))
        leaf = TensorLeaf(t["key"], t["kind"], t["dtype"], tuple(t["shape"]), dst)
        if "cuda" in t:
            if t["cuda"]["dev"] not in devices:
                raise ProtocolError(f"{t['key']}: this daemon cannot reach CUDA device {t['cuda']['dev']} "
                                    f"(it sees: {', '.join(sorted(devices)) or 'none'})", "bad_field")
            if t["nbytes"]:
                on_gpu.append((leaf, t["cuda"]))
        leaves.append(leaf)
    if len({leaf.key for leaf in leaves}) != len(leaves):
        raise ProtocolError("two tensors share a key path", "bad_field")
    return leaves, copies, on_gpu
