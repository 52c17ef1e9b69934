"""Which rank this process is (client/ranks.py): from the process group, else the launcher's
environment, else connect()'s arguments; contradictions and impossible ranks are refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from snapd.client.ranks import Ranks, detect
from snapd.errors import InvalidArgument


@pytest.fixture
def env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_single_process_is_rank_0_of_1(env) -> None:
    assert detect() == Ranks(0, 1, 0, "a single process")
    assert detect(2, 4) == Ranks(2, 4, 0, "connect(rank=, world_size=)")


def test_the_launchers_environment(env) -> None:
    env.setenv("RANK", "3")
    env.setenv("WORLD_SIZE", "8")
    env.setenv("LOCAL_RANK", "1")
    assert detect() == Ranks(3, 8, 1, "$RANK and $WORLD_SIZE")
    assert detect(3, 8).rank == 3  # (arguments that agree are fine)
    with pytest.raises(InvalidArgument, match=r"contradict \$RANK and \$WORLD_SIZE: rank 3 of 8"):
        detect(2, 8)
    env.setenv("RANK", "8")
    with pytest.raises(InvalidArgument, match="rank 8 of world size 8"):
        detect()
    env.setenv("RANK", "three")
    with pytest.raises(InvalidArgument, match=r"\$RANK must be an integer, got 'three'"):
        detect()


def test_arguments_come_in_pairs_and_are_ints(env) -> None:
    with pytest.raises(InvalidArgument, match="together"):
        detect(rank=1)
    with pytest.raises(InvalidArgument, match="rank must be an int"):
        detect(rank="1", world_size=2)
    with pytest.raises(InvalidArgument, match="rank -1 of world size 2"):
        detect(-1, 2)


def test_the_process_group_wins_over_the_environment(env, tmp_path) -> None:
    env.setenv("RANK", "5")
    env.setenv("WORLD_SIZE", "6")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert torch.distributed.is_initialized()
        assert detect() == Ranks(0, 1, 0, "the torch.distributed process group")
        with pytest.raises(InvalidArgument, match="contradict the torch.distributed process group"):
            detect(5, 6)
    finally:
        dist.destroy_process_group()


def test_one_rank_may_write_alone_and_runs_are_named_by_the_launcher(env) -> None:
    from snapd.client.ranks import run_id

    for name in ("SNAPD_RUN_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID",
                 "SLURM_STEP_ID", "SLURM_RESTART_COUNT"):
        env.delenv(name, raising=False)
    env.setenv("RANK", "0")
    env.setenv("WORLD_SIZE", "4")
    solo = detect(0, 1)  # rank 0 gathers the full state and writes the job alone
    assert (solo.rank, solo.world_size) == (0, 1)
    with pytest.raises(InvalidArgument, match="contradict"):
        detect(1, 1)
    ranks = detect()
    assert run_id(None, ranks) == ""
    env.setenv("SLURM_JOB_ID", "77")
    env.setenv("SLURM_RESTART_COUNT", "2")
    assert run_id(None, ranks) == "slurm:77::2"
    env.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_id(None, ranks) == "torchrun:abc:0"
    env.setenv("SNAPD_RUN_ID", "mine")
    assert run_id(None, ranks) == "mine" and run_id("given", ranks) == "given"
    with pytest.raises(InvalidArgument, match="run_id"):
        run_id("x" * 200, ranks)
