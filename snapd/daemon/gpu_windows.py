"""How a snapshot's device tensors travel through one device staging buffer to the host buffer.

``plan`` cuts the tensors (in host-buffer order) into windows of at most
the staging buffer's size. Each window is one kernel launch (pack, and
shuffle each writer chunk when the codec shuffles: a piece of a tensor
therefore starts on a chunk boundary) and a few device->host copies:
- one per run of adjacent pieces only: a gap of 64 bytes or more between two
  device tensors may hold a tensor the client copied itself, which staging
  garbage must not overwrite (tensors lie at 64-byte aligned offsets);
- never across a pin piece: host buffers are page-locked piece by piece.
Pure arithmetic, so tests check it on the CPU: against a NumPy execution, and through the segment
kernel itself built for the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snapd.kernels import chunk_step
from snapd.kernels.segments import COPY, SHUFFLE, Launch, Segment, chunk_segments, launches

STAGING_BYTES = 256 << 20  # one window per device
# Host buffers are pinned piece by piece: pinning holds the process's mmap lock, which a whole
# large buffer held for long enough to stall the server thread (docs/design.md)
PIN_PIECE = 64 << 20
ALIGN = 64  # the client's layout: tensors at 64-byte aligned offsets in the host buffer


@dataclass
class Piece:
    src: int  # device address of the piece's first byte
    rel: int  # where it goes in the staging buffer
    nbytes: int
    itemsize: int


@dataclass
class Window:
    start: int  # host-buffer offset of staging byte 0
    pieces: list[Piece] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (host offset, staging offset, bytes)


def plan(tensors: list[tuple[int, int, int, int]], shuffle: bool, chunk_bytes: int,
         staging_bytes: int = STAGING_BYTES, pin_piece: int = PIN_PIECE) -> list[Window]:
    """Windows for ``tensors`` = [(device address, host offset, bytes, itemsize)]."""
    windows: list[Window] = []
    cur: Window | None = None
    for src, off, n, k in sorted(tensors, key=lambda t: t[1]):
        step = chunk_step(k, chunk_bytes) if shuffle else 1
        a = 0
        while a < n:
            if cur is None or cur.start + staging_bytes - (off + a) < min(step, n - a):
                cur = Window(off + a)
                windows.append(cur)
            room = cur.start + staging_bytes - (off + a)
            take = min(n - a, room)
            if shuffle and take < n - a:
                take -= take % step  # whole chunks, so the piece shuffles as the writer cuts
            cur.pieces.append(Piece(src + a, off + a - cur.start, take, k))
            a += take
    for w in windows:
        runs: list[list[int]] = []
        for p in sorted(w.pieces, key=lambda p: p.rel):
            if runs and p.rel - runs[-1][1] < ALIGN:
                runs[-1][1] = max(runs[-1][1], p.rel + p.nbytes)
            else:
                runs.append([p.rel, p.rel + p.nbytes])
        for a, b in runs:
            while a < b:
                end = min(b, (w.start + a) // pin_piece * pin_piece + pin_piece - w.start)
                w.copies.append((w.start + a, a, end - a))
                a = end
    return windows


def segments(w: Window, stage: int, shuffle: bool, chunk_bytes: int) -> list[Segment]:
    """The segment kernel's work for window ``w``, the staging buffer at device address ``stage``:
    each piece packed to its place, and cut into the writer's chunks and shuffled when ``shuffle``."""
    out: list[Segment] = []
    for p in w.pieces:
        out += (chunk_segments(p.src, stage + p.rel, p.nbytes, p.itemsize, chunk_bytes, SHUFFLE)
                if shuffle and p.itemsize > 1 else [(p.src, stage + p.rel, p.nbytes, 1, COPY)])
    return out


@dataclass
class DevicePlan:
    """One device's part of a snapshot, ready to run again for every snapshot of its layout: per
    window, the kernel's launches and the device->host copies (host offsets relative to the host
    buffer, so any buffer will do). Made with the handles' mapped bases in ``bases``: valid while
    each is still mapped there."""

    bases: dict[tuple[str, str], int]  # (device, handle) -> mapped base
    steps: list[tuple[list[Launch], list[tuple[int, int, int]]]]


def device_plan(tensors: list[tuple[int, int, int, int]], bases: dict[tuple[str, str], int], stage: int,
                shuffle: bool, chunk_bytes: int) -> DevicePlan:
    """The plan of ``tensors`` = [(device address, host offset, bytes, itemsize)] through the
    staging buffer at device address ``stage``."""
    return DevicePlan(bases, [(launches(segments(w, stage, shuffle, chunk_bytes)), w.copies)
                              for w in plan(tensors, shuffle, chunk_bytes)])
