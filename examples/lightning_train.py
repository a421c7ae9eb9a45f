"""Lightning + savegame: a digits classifier that survives kill -9 and resumes exactly.

    python examples/lightning_train.py runs/lightning-digits      # trains 5 epochs (~10 s on CPU)
    # interrupt it (Ctrl-C saves and exits 75; kill -9 loses at most 50 steps), run it again:
    python examples/lightning_train.py runs/lightning-digits      # continues where it stopped

The only savegame lines are the callback and the StatefulDataLoader: the callback restores the
newest valid checkpoint of the run folder by itself at the start of fit (no ckpt_path), with the
loops, optimizer, scheduler, every RNG and the loader's position in the epoch.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg
from savegame.integrations.lightning import SavegameCallback


class Digits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 10),
        )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(root: str) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, val = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])
    ckpt = SavegameCallback(
        root,
        save=sg.Every(steps=50),
        keep=sg.Keep(last=2, best=2, monitor="val_acc", mode="max"),
    )
    trainer = pl.Trainer(
        max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[ckpt]
    )
    trainer.fit(
        Digits(),
        train_dataloaders=StatefulDataLoader(train, batch_size=32, shuffle=True),
        val_dataloaders=DataLoader(val, batch_size=256),
    )
    print(f"resumed from step {ckpt.restored_step}" if ckpt.restored_step else "started fresh")
    print(
        f"val_acc {float(trainer.callback_metrics['val_acc']):.4f}; checkpoints in {root} (`savegame ls {root}`)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lightning-digits")
