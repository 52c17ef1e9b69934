"""The Hugging Face ``Trainer`` snapshots through snapd: ``Trainer(..., callbacks=[SnapdCallback()])``.

At each step the Trainer would save (its ``save_strategy``/``save_steps``), the callback hands the
model's and optimizer's state, the scheduler's, the RNG states and the trainer state to the daemon
and returns; the Trainer's own synchronous save is skipped for that step. The daemon keeps
``save_total_limit`` snapshots (all of them without one).

To resume, the latest snapshot is laid out as a checkpoint directory the Trainer reads itself
(``pytorch_model.bin``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``), so the Trainer restores everything, data position included, as from its
own checkpoint::

    trainer.train(resume_from_checkpoint=snapd.integrations.hf.checkpoint_dir(job, output_dir))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from snapd.errors import InvalidArgument
from snapd.integrations.rng import rng_states, rng_states_back

log = logging.getLogger(__name__)


class SnapdCallback(TrainerCallback):
    """Snapshots the Trainer's state through snapd's daemon at the Trainer's save steps. ``job``:
    the snapshots' job (default ``$SNAPD_JOB``, else the output directory's name);
    ``endpoint``/``spawn``/``root``: as ``snapd.connect``. ``share``: at the first save, move the
    model's and optimizer's tensors into shared memory the daemon reads (``client.share``): a save
    then sends only their description, the daemon copies during the next forward and backward,
    and the optimizer's step waits for that copy if it is not done."""

    def __init__(self, job: str | None = None, *, endpoint: str | None = None, spawn: bool = True,
                 root: str | os.PathLike | None = None, share: bool = False) -> None:
        self.job = job
        self._args = {"endpoint": endpoint, "spawn": spawn, "root": root}
        self.share = share
        self._shared = False
        self._client: Any = None
        self._pending: list[Any] = []

    def _connect(self, args: Any) -> Any:
        if self._client is None:
            import snapd.client as snapd

            job = self.job or os.environ.get("SNAPD_JOB") or Path(args.output_dir).name or "hf-trainer"
            self._client = snapd.connect(job, keep_last=args.save_total_limit, per_rank=["rng"], **self._args)
        return self._client

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kwargs: Any) -> Any:
        if not control.should_save:
            return control
        if model is None or optimizer is None:
            raise InvalidArgument("SnapdCallback: the Trainer gave the callback no model or optimizer to "
                                  "save")
        client = self._connect(args)
        if self.share and not self._shared:  # (once: the tensors move into shared memory)
            inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper holds the optimizer)
            client.share(model, inner)
            client.guard(inner)
            self._shared = True
        snapshot = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else {},
                    "rng": rng_states(), "trainer_state": json.loads(json.dumps(dataclasses.asdict(state)))}
        metrics = {k: v for k, v in (state.log_history[-1] if state.log_history else {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._pending.append(client.snapshot(snapshot, step=state.global_step, metrics=metrics))
        self._pending = [p for p in self._pending if not p.done()]
        control.should_save = False  # (the Trainer's own synchronous save: skipped for this step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.close()
        return control

    def close(self) -> None:
        """Wait for the snapshots still being written (a failed one raises here), then let go."""
        try:
            for p in self._pending:
                p.wait()
        finally:
            self._pending = []
            if self._client is not None:
                self._client.close()
                self._client = None


def checkpoint_dir(job: str, into: str | os.PathLike, *, step: int | str = "latest", root: Any = None,
                   endpoint: str | None = None, spawn: bool = True) -> str | None:
    """Lay snapshot ``step`` of ``job`` out under ``into`` as the Trainer's checkpoint directory
    (``checkpoint-<step>``) and return its path, for ``trainer.train(resume_from_checkpoint=...)``;
    None when the job has no snapshot yet (a first run starts fresh). ``root``: the snapshot root
    (else the daemon's, asked at ``endpoint``; with ``spawn``, one is started if none runs, as the
    callback would). On several ranks (the Trainer's process group), call it on every rank: each
    writes its own RNG states, rank 0 the rest."""
    import snapd.client as snapd
    from snapd.errors import SnapshotNotFound

    rank, world = _rank_and_world()
    if root is None:
        with snapd.connect(job, endpoint=endpoint, spawn=spawn) as c:
            root = c.root
    try:
        state = snapd.load(root, job, step, device="cpu", rank=rank)  # (this rank's RNG states)
    except SnapshotNotFound:
        return None
    out = Path(into) / f"checkpoint-{state['trainer_state']['global_step']}"
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # (the rest is the same on every rank of a data-parallel job)
        torch.save(state["model"], out / "pytorch_model.bin")
        torch.save(state["optimizer"], out / "optimizer.pt")
        torch.save(state["scheduler"], out / "scheduler.pt")
        (out / "trainer_state.json").write_text(json.dumps(state["trainer_state"], indent=2))
    rng_file = "rng_state.pth" if world == 1 else f"rng_state_{rank}.pth"  # (the Trainer's names)
    torch.save(rng_states_back(state["rng"]), out / rng_file)
    if world > 1:
        torch.distributed.barrier()  # (every rank reads what rank 0 wrote)
    log.info("snapshot %s of job %s laid out for the Trainer at %s", step, job, out)
    return str(out)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
