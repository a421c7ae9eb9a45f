"""Lightning + savegame: a digits classifier that survives kill -9 and resumes exactly.

    python examples/lightning_train.py runs/lightning-digits      # trains 5 epochs (~10 s on CPU)
    # interrupt it (Ctrl-C saves and exits 75; kill -9 loses at most 50 steps), run it again:
    python examples/lightning_train.py runs/lightning-digits      # continues where it stopped
    python examples/lightning_train.py runs/ddp-digits --ddp 2    # DDP, 2 processes (gloo, CPU)

The only savegame lines are the callback and the StatefulDataLoader: the callback restores the
newest valid checkpoint of the run folder by itself at the start of fit (no ckpt_path), with the
loops, optimizer, scheduler, every RNG and the loader's position in the epoch.

Under DDP (``--ddp N``) the loader gets its ``DistributedSampler`` from this script and the
Trainer ``use_distributed_sampler=False``: Lightning's own replacement sampler redraws every
epoch's order from the global RNG, which a mid-epoch resume cannot reproduce (the callback warns).
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
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
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(root: str, ddp: int = 0) -> None:
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
    if ddp:
        # Lightning starts the other ranks by running this script again, with LOCAL_RANK set
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        sampler = DistributedSampler(train, num_replicas=ddp, rank=rank, shuffle=True, seed=0)
        loader = StatefulDataLoader(train, batch_size=32, sampler=sampler)
        parallel = {"strategy": "ddp", "devices": ddp, "use_distributed_sampler": False}
    else:
        loader = StatefulDataLoader(train, batch_size=32, shuffle=True)
        parallel = {}
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[ckpt],
        **parallel,
    )
    trainer.fit(Digits(), train_dataloaders=loader, val_dataloaders=DataLoader(val, batch_size=256))
    if trainer.is_global_zero:
        print(f"resumed from step {ckpt.restored_step}" if ckpt.restored_step else "started fresh")
        acc = trainer.callback_metrics.get("val_acc")  # none when the run had already finished
        print(
            f"val_acc {'-' if acc is None else f'{float(acc):.4f}'}; checkpoints in {root} "
            f"(`savegame ls {root}`)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Lightning + savegame on scikit-learn's digits")
    parser.add_argument("root", nargs="?", default="runs/lightning-digits")
    parser.add_argument("--ddp", type=int, default=0, help="train with DDP on N CPU processes")
    args = parser.parse_args()
    main(args.root, args.ddp)
