"""PyTorch Lightning with snapd: ``python examples/lightning_checkpointio.py [CKPT_DIR]``.

Lightning's minimal example with one line added (``plugins=[SnapdCheckpointIO(...)]``): its
ModelCheckpoint still decides when to save and what to keep; each save hands the checkpoint to
snapd's daemon (spawned if none runs) and training goes on. Run it twice: the second run resumes
from ``last.ckpt``.
"""

import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from snapd.integrations.lightning import SnapdCheckpointIO


class Model(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


ckpt_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/snapd-examples/lightning"
data = DataLoader(TensorDataset(torch.randn(512, 32), torch.randn(512, 1)), batch_size=32)
trainer = pl.Trainer(max_steps=100, logger=False, enable_progress_bar=False,
                     plugins=[SnapdCheckpointIO("lightning-example")],  # <- the snapd line
                     callbacks=[pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=20,
                                                             save_top_k=2, monitor="loss", save_last=True)])
trainer.fit(Model(), data, ckpt_path="last")  # (the first run finds none and starts fresh)
print(f"trained to step {trainer.global_step}; checkpoints (snapd pointers) in {ckpt_dir}")
