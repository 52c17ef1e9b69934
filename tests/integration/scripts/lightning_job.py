"""``lightning_job.py MODE ENDPOINT CKPT_DIR``: a tiny Lightning model trained with snapd's CheckpointIO.

- ``train``: ModelCheckpoint every 3 steps (top 2 by loss, and last.ckpt); each checkpoint is also
  written by Lightning's own TorchCheckpointIO beside it (``<path>.torch``, the same state); the
  process SIGKILLs itself right after step 6's checkpoint was handed over.
- ``resume``: a new process, ``trainer.fit(ckpt_path="last")`` through the plugin, to step 9;
  prints ``RESUMED <global step at start>``.
- ``hparams``: a module whose hyper-parameters hold an object; its checkpoint must be refused
  naming the key. Prints ``REFUSED <message>``.
- ``ddp-train`` / ``ddp-resume``: the same on 2 DDP ranks (Lightning's own launcher starts the
  second process; CPU, gloo). Rank 0 saves; at step 6 it SIGKILLs the whole job (its process
  group: a node lost). Each rank prints ``RESUMED <rank> <step> <digest>`` at the start of training
  (the digest covers its weights and AdamW state as restored) and ``FINAL <rank> <digest>``.
"""

import hashlib
import os
import signal
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from snapd.integrations.lightning import SnapdCheckpointIO

mode, endpoint, ckpt_dir = sys.argv[1:4]


class Model(pl.LightningModule):
    def __init__(self, width: int = 32, lr: float = 0.01, extra: object = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}


class KilledAfterStep6(SnapdCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        TorchCheckpointIO().save_checkpoint(checkpoint, f"{path}.torch")
        if checkpoint["global_step"] == 6 and os.path.basename(path) == "last.ckpt":
            if ddp:  # every rank at once, as when the node is lost
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def digest(tensors: dict) -> str:
    """sha256 of the tensors' bytes in key order (the test computes the same from a checkpoint)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trained_state(trainer, module) -> dict:
    out = {f"w.{k}": v for k, v in module.state_dict().items()}
    for i, s in trainer.optimizers[0].state_dict()["state"].items():
        out.update({f"o.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def say(line: str) -> None:
    """One write per line: the DDP ranks share the output."""
    os.write(1, f"{line}\n".encode())


class Started(pl.Callback):
    def on_train_start(self, trainer, module):
        if ddp:
            state = digest(trained_state(trainer, module))
            say(f"RESUMED {trainer.global_rank} {trainer.global_step} {state}")
        else:
            print(f"RESUMED {trainer.global_step}", flush=True)

    def on_train_end(self, trainer, module):
        if ddp:
            say(f"FINAL {trainer.global_rank} {digest(trained_state(trainer, module))}")


ddp = mode.startswith("ddp-")
mode = mode.removeprefix("ddp-")
torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randn(64, 1)), batch_size=8)
io = (KilledAfterStep6 if mode == "train" else SnapdCheckpointIO)("lt", endpoint=endpoint, spawn=False)
on = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"} if ddp else {}
checkpoints = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=2,
                                           monitor="loss", save_last=True)
trainer = pl.Trainer(max_steps=9, plugins=[io], callbacks=[checkpoints, Started()], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **on)
if mode == "train":
    trainer.fit(Model(), data)
elif mode == "resume":
    trainer.fit(Model(), data, ckpt_path="last")
elif mode == "hparams":
    try:
        trainer.fit(Model(extra=object()), data)
    except Exception as e:
        print(f"REFUSED {type(e).__name__}: {e}", flush=True)
