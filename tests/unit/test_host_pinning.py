"""The host buffers' pinning for the GPU path (snapd/daemon/host_pinning.py), with the driver's
register calls replaced (no GPU here): nothing is pinned before a device is in use, each buffer is
pinned once, and dropping a buffer never waits: one being pinned is unpinned and unmapped once pinned."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from snapd import cuda_driver
from snapd.daemon import gpu_windows
from snapd.daemon.host_pinning import HostPins


@pytest.fixture
def driver(monkeypatch):
    """Register calls as (context, address, bytes), unregisters as addresses; a register of an address
    in ``slow`` blocks until ``slow[address]`` is set."""
    calls = {"register": [], "unregister": [], "slow": {}}

    def register(context, address, nbytes):
        gate = calls["slow"].get(address)
        if gate is not None:
            assert gate.wait(10)
        calls["register"].append((context, address, nbytes))

    monkeypatch.setattr(cuda_driver, "host_register", register)
    monkeypatch.setattr(cuda_driver, "host_unregister",
                        lambda context, address: calls["unregister"].append(address))
    monkeypatch.setattr(gpu_windows, "PIN_PIECE", 1 << 20)
    return calls


def _wait(cond) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_buffers_wait_for_a_context_then_are_pinned_once_in_pieces(driver) -> None:
    a, b = np.zeros(3 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
    pins = HostPins()
    pins.ahead([a, b])
    pins.now(a)  # (no device in use yet: nothing to pin with)
    assert driver["register"] == []
    pins.start(context=7)
    _wait(lambda: len(driver["register"]) == 4)
    pins.now(a)
    pins.start(context=8)  # (a second device changes nothing)
    assert sorted(driver["register"]) == sorted([(7, a.ctypes.data + i * (1 << 20),
                                                  1 << 20) for i in range(3)]
                                                + [(7, b.ctypes.data, 1 << 20)])
    pins.drop(a.ctypes.data)
    assert driver["unregister"] == [a.ctypes.data + i * (1 << 20) for i in range(3)]
    pins.drop(a.ctypes.data)  # (already gone: nothing more)
    assert len(driver["unregister"]) == 3


def test_a_buffer_dropped_before_any_context_is_never_pinned(driver) -> None:
    a, b = np.zeros(1 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
    pins = HostPins()
    pins.ahead([a, b])
    pins.drop(a.ctypes.data)
    pins.start(context=1)
    _wait(lambda: len(driver["register"]) == 1)
    time.sleep(0.05)
    assert [addr for _, addr, _ in driver["register"]] == [b.ctypes.data]


def test_dropping_a_buffer_being_pinned_returns_at_once_and_unmaps_it_once_pinned(driver) -> None:
    slow, other = np.zeros(1 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
    gate = driver["slow"][slow.ctypes.data] = threading.Event()
    pins = HostPins()
    pins.start(context=1)
    pins.now(other)
    pinning = threading.Thread(target=pins.now, args=(slow,))
    pinning.start()
    _wait(lambda: slow.ctypes.data in pins._pinning)
    pins.drop(other.ctypes.data)  # returns while the slow one is still being pinned
    assert driver["unregister"] == [other.ctypes.data]
    unmapped = threading.Event()
    pins.drop(slow.ctypes.data, unmapped.set)  # returns at once (the server thread drops buffers)
    time.sleep(0.1)
    assert not unmapped.is_set() and driver["unregister"] == [other.ctypes.data]  # not pinned yet
    gate.set()
    pinning.join(10)
    assert unmapped.wait(10)  # the pinning thread unpinned it once pinned, then unmapped it
    assert driver["unregister"] == [other.ctypes.data, slow.ctypes.data]
