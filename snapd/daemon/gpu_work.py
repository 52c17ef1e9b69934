"""What the GPU path's two threads work on: a device's resources, and the items of their queues.

The GPU thread takes ``Copy`` (a snapshot's copies), ``Prepare`` (a device to make ready) and
``Forget`` (a leaving client's handles); the waiting thread takes ``Wait`` (a snapshot's copies
to wait for, or its failure) and ``Close`` (a handle no snapshot uses any more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapd import cuda_driver
from snapd.daemon import gpu_windows


class Device:
    """The daemon's context, copy stream and staging window on one device."""

    def __init__(self, cp: Any, ordinal: int, uuid: str) -> None:
        self.ordinal, self.uuid = ordinal, uuid
        self.context = cuda_driver.primary_context(ordinal)
        with cp.cuda.Device(ordinal):
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.staging = cp.empty(gpu_windows.STAGING_BYTES, dtype=cp.uint8)


@dataclass
class Copy:
    """A snapshot's copies, queued for the GPU thread (``snapd.daemon.gpu_copy.GpuCopier.copy``)."""

    task: Any
    items: list[tuple[Any, dict]]  # (leaf over the host buffer, its `cuda` descriptor)
    ready: dict[str, str]  # device UUID -> the trainer's event handle
    host: Any  # the host buffer's view
    shuffle: bool
    region_copies: list  # registered-region copies of the same snapshot
    plans: dict | None


@dataclass
class Prepare:
    uuid: str


@dataclass
class Forget:
    peer: bytes
    bye: int | None


@dataclass
class Wait:
    """For the waiting thread: a snapshot's copies to wait for (``marks``), or its failure."""

    task: Any
    marks: list | None
    error: dict | None


@dataclass
class Close:
    """For the waiting thread: a handle no snapshot uses any more, closed once ``marks`` are done."""

    context: Any
    base: int
    marks: list
