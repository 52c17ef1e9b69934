"""The client's allocation cache on the GPU path, against a fake CUDA driver (CI has no GPU; the
real driver runs in tests/gpu): one driver check per allocation per snapshot, not per tensor, and an
allocation freed and made again at a cached address is found, with its new handle."""

from __future__ import annotations

import pytest

from snapd import cuda_driver
from snapd.client.cuda_export import CudaExport
from snapd.format.leaves import TensorLeaf


class FakeDriver:
    def __init__(self) -> None:
        self.live: dict[int, tuple[int, int]] = {}  # allocation id -> (base, size)
        self.checks = 0
        self.lookups = 0

    def find(self, ptr: int) -> tuple[int, int, int]:
        for bid, (base, size) in self.live.items():
            if base <= ptr < base + size:
                return bid, base, size
        raise cuda_driver.CudaError(f"no allocation at {ptr:#x}")

    def buffer_id(self, ptr: int) -> int:
        self.checks += 1
        return self.find(ptr)[0]

    def allocation(self, ptr: int) -> object:
        self.lookups += 1
        bid, base, size = self.find(ptr)
        alloc = type("Alloc", (), {})()
        alloc.base, alloc.size, alloc.buffer_id, alloc.ordinal, alloc.ipc_capable, alloc.context = \
            base, size, bid, 0, True, 1
        return alloc


@pytest.fixture
def driver(monkeypatch) -> FakeDriver:
    fake = FakeDriver()
    monkeypatch.setattr(cuda_driver, "buffer_id", fake.buffer_id)
    monkeypatch.setattr(cuda_driver, "Allocation", fake.allocation)
    monkeypatch.setattr(cuda_driver, "device_uuid", lambda ordinal: "GPU-fake")
    monkeypatch.setattr(cuda_driver, "mem_handle", lambda alloc: alloc.buffer_id.to_bytes(64, "little"))
    monkeypatch.setattr(cuda_driver, "pid_namespace", lambda: 4026531836)
    return fake


def _leaves(ptrs: list[int]) -> list[TensorLeaf]:
    return [TensorLeaf(f"t{i}", "torch", "float32", (4,), None, None, 16, p, on_device=True)
            for i, p in enumerate(ptrs)]


def test_one_check_per_allocation_and_a_remade_allocation_is_found(driver) -> None:
    export = CudaExport({"devices": ["GPU-fake"], "pid_ns": 4026531836})
    driver.live = {1: (0x1000, 0x1000), 2: (0x8000, 0x100)}
    leaves = _leaves([0x1000, 0x1100, 0x1f00, 0x8000])
    first = export.describe_all(leaves)
    assert driver.lookups == 2 and driver.checks == 0  # one query an allocation, not one a tensor
    assert [d["offset"] for d in first.values()] == [0, 0x100, 0xF00, 0]
    assert first[0]["handle"] == first[2]["handle"] != first[3]["handle"]

    again = export.describe_all(leaves)  # a later snapshot: each allocation checked once
    assert again == first and driver.lookups == 2 and driver.checks == 2

    # allocation 1 freed; a new one (id 3) made at the same base, smaller: its tensors move
    driver.live = {3: (0x1000, 0x200), 2: (0x8000, 0x100), 4: (0x1f00, 0x100)}
    moved = export.describe_all(leaves)
    assert moved[0]["handle"] == moved[1]["handle"] == (3).to_bytes(64, "little").hex()
    assert moved[2]["handle"] == (4).to_bytes(64, "little").hex() and moved[2]["offset"] == 0
    assert moved[3] == first[3]
    assert driver.lookups == 2 + 2  # each new allocation queried once


def test_many_tensors_in_few_allocations_take_one_query_each_and_edges_are_exact(driver) -> None:
    """A thousand new tensors in two allocations: two queries. An address at the very end of one
    allocation is the next one's start, not inside the first."""
    export = CudaExport({"devices": ["GPU-fake"], "pid_ns": 4026531836})
    driver.live = {1: (0x10000, 0x10000), 2: (0x20000, 0x10000)}
    leaves = _leaves([0x10000 + 64 * i for i in range(1024)] + [0x20000])
    out = export.describe_all(leaves)
    assert driver.lookups == 2 and driver.checks == 0
    assert out[1023]["offset"] == 64 * 1023 and out[1024]["offset"] == 0
    assert out[1023]["handle"] != out[1024]["handle"]


def test_a_replayed_snapshot_checks_each_allocation_and_sees_one_remade(driver) -> None:
    """A snapshot replayed from a memo (client/snapshot_plan.py) describes nothing anew: it checks
    that each allocation it names is still the one described, one driver call each."""
    export = CudaExport({"devices": ["GPU-fake"], "pid_ns": 4026531836})
    driver.live = {1: (0x1000, 0x1000), 2: (0x8000, 0x100)}
    leaves = _leaves([0x1000, 0x1100, 0x8000])
    export.describe_all(leaves)
    allocations = export.allocations([leaf.ptr for leaf in leaves])
    assert sorted(allocations) == [(0x1000, 1), (0x8000, 2)]
    driver.checks = 0
    assert export.still_live(allocations) and driver.checks == 2
    driver.live = {3: (0x1000, 0x1000), 2: (0x8000, 0x100)}  # freed, and made again at the same address
    assert not export.still_live(allocations)
    driver.live = {2: (0x8000, 0x100)}  # freed (the driver says so)
    assert not export.still_live(allocations)
