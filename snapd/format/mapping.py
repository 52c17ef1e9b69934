"""Private (copy-on-write) mappings of data files for restores that copy nothing.

Python's ``mmap.mmap`` keeps a duplicate of the file descriptor for as long as the mapping lives,
so every restored tensor would hold a descriptor open: a process keeping the tensors of a few
hundred data files would run out. This maps with mmap(2) through ctypes instead and holds no
descriptor: the mapping is a ctypes array, unmapped when the last buffer over it is freed
(numpy and torch keep the array alive through the buffers they take from it).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import weakref
from typing import Any

_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> tuple[Any, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    mmap_fn, munmap_fn = libc.mmap, libc.munmap
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                        ctypes.c_long]
    munmap_fn.restype = ctypes.c_int
    munmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return mmap_fn, munmap_fn


def map_private(fd: int, length: int) -> memoryview:
    """The first ``length`` bytes of ``fd``'s file, mapped private and writable (a write copies the
    page into this process; the file never changes), as a byte view. OSError if it cannot be."""
    if length <= 0:
        raise ValueError("cannot map an empty file")
    mmap_fn, munmap_fn = _libc()
    addr = mmap_fn(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    pages = (ctypes.c_ubyte * length).from_address(addr)
    weakref.finalize(pages, munmap_fn, addr, length)
    return memoryview(pages).cast("B")
