"""How much memory the host buffers may take: cgroup limits as systemd and batch schedulers set
them (v1 and v2 trees written out as the kernel shows them), the growth step, and the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapd.daemon import host_memory
from snapd.daemon.config import DaemonConfig
from snapd.errors import InvalidArgument

MIB = 1 << 20
GIB = 1 << 30


def _tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    (tmp_path / "proc-cgroup").write_text(proc)
    return tmp_path / "proc-cgroup", root


def test_v2_takes_the_lowest_limit_on_the_path_and_the_least_headroom(tmp_path) -> None:
    proc, root = _tree(tmp_path, "0::/system.slice/snapd-ckpt.service\n", {
        "memory.max": "max",
        "system.slice/memory.max": str(32 * GIB), "system.slice/memory.current": str(30 * GIB),
        "system.slice/snapd-ckpt.service/memory.max": str(24 * GIB),
        "system.slice/snapd-ckpt.service/memory.current": str(1 * GIB)})
    # the slice has 2 GiB left, the unit 23
    assert host_memory.cgroup_limits(proc, root) == (24 * GIB, 2 * GIB)


def test_v1_memory_controller_and_no_limit(tmp_path) -> None:
    proc, root = _tree(tmp_path, "9:cpu,cpuacct:/job\n4:memory:/slurm/job_7\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712",  # "unlimited", as v1 writes it
        "memory/slurm/job_7/memory.limit_in_bytes": str(16 * GIB),
        "memory/slurm/job_7/memory.usage_in_bytes": str(4 * GIB)})
    assert host_memory.cgroup_limits(proc, root) == (16 * GIB, 12 * GIB)
    proc, root = _tree(tmp_path / "none", "0::/\n", {"memory.max": "max"})
    assert host_memory.cgroup_limits(proc, root) == (None, None)
    assert host_memory.cgroup_limits(tmp_path / "missing", root) == (None, None)


def test_a_container_sees_only_its_own_part_of_the_tree(tmp_path) -> None:
    """/proc/self/cgroup names a path above the container's mount: the levels visible still count."""
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {"memory.max": str(8 * GIB),
                                                            "memory.current": str(GIB)})
    assert host_memory.cgroup_limits(proc, root) == (8 * GIB, 7 * GIB)


def test_growth_leaves_headroom_in_64_mib_steps_and_stops_at_the_bound() -> None:
    assert host_memory.grown_size(3 * MIB, 8 * GIB) == 64 * MIB
    assert host_memory.grown_size(16 * GIB, 32 * GIB) == 17 * GIB  # a sixteenth more
    assert host_memory.grown_size(int(1.5 * MIB), 2 * MIB) == 2 * MIB  # the bound
    assert host_memory.grown_size(2 * MIB, 2 * MIB) == 2 * MIB


def test_the_bound_is_at_least_the_starting_size_and_set_by_default(tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="max_host_buffer_bytes .* less than host_buffer_bytes"):
        DaemonConfig(root=tmp_path, endpoint=f"ipc://{tmp_path}/s.sock", host_buffer_bytes=64 * MIB,
                     max_host_buffer_bytes=32 * MIB)
    flags = {"root": tmp_path, "endpoint": f"ipc://{tmp_path}/s.sock", "host_buffer_bytes": 64 * MIB}
    c = DaemonConfig.from_sources(flags, env={}, config_file=None)
    assert c.max_host_buffer_bytes is not None and c.max_host_buffer_bytes >= 64 * MIB
    assert c.max_host_buffer_bytes <= max(64 * MIB, host_memory.memory_limit() // 4)
    assert f"max_host_buffer_bytes = {c.max_host_buffer_bytes}" in c.to_toml()
    env = {"SNAPD_MAX_HOST_BUFFER_BYTES": str(64 * MIB)}
    assert DaemonConfig.from_sources(flags, env=env, config_file=None).buffer_cap == 64 * MIB  # growth off
    direct = DaemonConfig(root=tmp_path, endpoint=f"ipc://{tmp_path}/s.sock", host_buffer_bytes=64 * MIB)
    assert direct.buffer_cap == 64 * MIB
