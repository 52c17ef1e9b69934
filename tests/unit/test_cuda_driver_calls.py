"""The client's pointer queries through ctypes (snapd/cuda_driver.py), against a stand-in
libcuda built here: CI has no GPU, and a wrong argument type (a 64-bit address passed as an
int, an attribute's value read at the wrong width) would only show on one. Each allocation of
the stand-in is the 2 MiB around the address, with an id derived from it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from snapd import cuda_driver

FAKE_LIBCUDA = r"""
#include <stddef.h>
typedef unsigned long long u64;
int cuInit(unsigned flags) { return 0; }
int cuGetErrorName(int rc, const char **name) { *name = rc == 1 ? "CUDA_ERROR_INVALID_VALUE" : "?"; return 0;
}
static int attribute(int attr, void *data, u64 ptr) {
    u64 base = ptr & ~((1ull << 21) - 1);
    if (ptr == 0) return 1;
    switch (attr) {
    case 1: *(void **)data = (void *)0xc0ffee; return 0;                  /* CONTEXT */
    case 7: *(u64 *)data = (base >> 21) | (1ull << 40); return 0;         /* BUFFER_ID */
    case 9: *(int *)data = 3; return 0;                                   /* DEVICE_ORDINAL */
    case 10: *(int *)data = (int)(base >> 21) & 1; return 0;              /* IS_LEGACY_CUDA_IPC_CAPABLE */
    case 11: *(u64 *)data = base; return 0;                               /* RANGE_START_ADDR */
    case 12: *(size_t *)data = 1u << 21; return 0;                        /* RANGE_SIZE */
    }
    return 1;
}
int cuPointerGetAttribute(void *data, int attr, u64 ptr) { return attribute(attr, data, ptr); }
int cuPointerGetAttributes(unsigned n, int *attrs, void **data, u64 ptr) {
    for (unsigned i = 0; i < n; i++) { int rc = attribute(attrs[i], data[i], ptr); if (rc) return rc; }
    return 0;
}
/* devices: ordinal n is the handle 100 + n, in compute mode n (0 default, 3 exclusive-process) */
int cuDeviceGet(int *dev, int ordinal) { if (ordinal < 0 || ordinal > 3) return 1; *dev = 100 + ordinal;
return 0; }
int cuDeviceGetAttribute(int *value, int attr, int dev) {
    if (attr != 20 || dev < 100) return 1;                                /* COMPUTE_MODE only */
    *value = dev - 100; return 0;
}
/* the staging copy: "device" memory is host memory here; what was called, in order, is logged */
u64 calls[16]; int ncalls = 0;
static void note(u64 v) { if (ncalls < 16) calls[ncalls++] = v; }
int cuCtxPushCurrent_v2(void *ctx) { note(1); note((u64)ctx); return 0; }
int cuCtxPopCurrent_v2(void **ctx) { note(2); *ctx = 0; return 0; }
int cuStreamSynchronize(void *stream) { note(3); note((u64)stream); return 0; }
int cuMemcpyDtoH_v2(void *dst, u64 src, size_t n) {
    note(4);
    if (src == 0) return 1;
    for (size_t i = 0; i < n; i++) ((char *)dst)[i] = ((const char *)src)[i];
    return 0;
}
"""

# addresses that need all 64 bits (a 32-bit conversion anywhere would lose the top)
ADDRESSES = [0x7F12_3456_789A, 0x7F12_3440_0000, 0xFFFF_8000_0020_1234, (1 << 21) + 5]


@pytest.fixture
def libcuda(tmp_path, monkeypatch) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libcuda")
    src, lib = tmp_path / "fake_libcuda.c", tmp_path / "libcuda_fake.so"
    src.write_text(FAKE_LIBCUDA)
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib), str(src)], check=True,
                   capture_output=True, text=True)
    monkeypatch.setattr(cuda_driver, "_lib", ctypes.CDLL(str(lib)))
    monkeypatch.setattr(cuda_driver, "_get_attribute", None)  # bound again, to the stand-in


def test_buffer_id_carries_the_whole_address_and_the_whole_id(libcuda) -> None:
    for ptr in ADDRESSES:
        assert cuda_driver.buffer_id(ptr) == (ptr >> 21) | (1 << 40), hex(ptr)
    assert cuda_driver.buffer_id(ADDRESSES[0]) == cuda_driver.buffer_id(ADDRESSES[1])  # the same allocation


def test_allocation_reads_every_attribute_at_its_width(libcuda) -> None:
    for ptr in ADDRESSES:
        a = cuda_driver.Allocation(ptr)
        base = ptr & ~((1 << 21) - 1)
        assert (a.base, a.size, a.buffer_id, a.ordinal, a.context) == (base, 1 << 21,
                                                                       (base >> 21) | (1 << 40), 3,
                                                                          0xC0FFEE), hex(ptr)
        assert a.ipc_capable is bool((base >> 21) & 1)


def test_a_failed_query_names_the_call_and_the_error(libcuda) -> None:
    with pytest.raises(cuda_driver.CudaError, match="cuPointerGetAttribute failed: CUDA_ERROR_INVALID_VALUE"):
        cuda_driver.buffer_id(0)
    with pytest.raises(cuda_driver.CudaError,
                       match="cuPointerGetAttributes failed: CUDA_ERROR_INVALID_VALUE"):
        cuda_driver.Allocation(0)


def test_a_staging_copy_waits_on_the_producers_stream_in_the_allocations_context(libcuda) -> None:
    """What the client does to stage an array neither torch nor CuPy copies (JAX, Numba, ...)."""
    lib = cuda_driver._lib
    src = ctypes.create_string_buffer(bytes(range(256)) * 40)
    dst = ctypes.create_string_buffer(len(src))
    stream, context = 0x7F00_DEAD_BEEF, 0xFFFF_8000_0000_C000  # (all 64 bits must get through)
    cuda_driver.copy_to_host(context, ctypes.addressof(dst), ctypes.addressof(src), 10_000, stream)
    assert dst.raw[:10_000] == src.raw[:10_000] and dst.raw[10_000:] == bytes(len(src) - 10_000)
    calls = (ctypes.c_uint64 * 16).in_dll(lib, "calls")[:ctypes.c_int.in_dll(lib, "ncalls").value]
    assert calls == [1, context, 3, stream, 4, 2]  # push, wait on the stream, copy, pop
    ctypes.c_int.in_dll(lib, "ncalls").value = 0
    cuda_driver.copy_to_host(context, ctypes.addressof(dst), ctypes.addressof(src), 16, 0)  # no stream named
    assert (ctypes.c_uint64 * 16).in_dll(lib, "calls")[:4] == [1, context, 4, 2]
    with pytest.raises(cuda_driver.CudaError, match="cuMemcpyDtoH_v2 failed"):
        cuda_driver.copy_to_host(context, ctypes.addressof(dst), 0, 16, 0)


def test_a_devices_compute_mode_is_asked_of_its_handle(libcuda) -> None:
    """The daemon skips a device in exclusive-process or prohibited mode (its context would lock the
    trainers out), asking without making a context there."""
    assert [cuda_driver.compute_mode(i) for i in range(4)] == [0, 1, 2, 3]
    assert cuda_driver.COMPUTE_MODES[3] == "exclusive-process" and cuda_driver.COMPUTE_MODE_DEFAULT == 0
    with pytest.raises(cuda_driver.CudaError, match="cuDeviceGet failed"):
        cuda_driver.compute_mode(9)
