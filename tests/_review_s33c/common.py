"""The user's training code for tests/test_review_s33_processes.py, shared by the test file
(imported by path, for the uninterrupted reference run) and tests/_review_s33c/job.py (the
training script the tests start, fork around, signal and kill).

A tiny MLP with dropout (the global torch RNG matters), a frozen base (incremental saves share
its bytes), Adam, and a ``StatefulDataLoader`` without shuffling over 48 samples (12 batches of
4 per epoch), so the data order is the same with and without workers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

SAMPLES, BATCH = 48, 4


class Run:
    def __init__(self, *, workers: int = 0, persistent: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.base = torch.nn.Linear(32, 32)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(32, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        data = torch.arange(SAMPLES * 32, dtype=torch.float32).reshape(SAMPLES, 32) / 1000.0
        kw: dict[str, Any] = {}
        if workers:
            kw = {"multiprocessing_context": "fork", "persistent_workers": persistent}
        self.loader = StatefulDataLoader(
            TensorDataset(data), batch_size=BATCH, shuffle=False, num_workers=workers, **kw
        )
        self.extras: dict[str, Any] = {"epoch": 0}
        self.state = sg.TrainState(
            base=self.base, model=self.model, optimizer=self.opt, loader=self.loader,
            extras=self.extras,
        )  # fmt: skip

    def train_step(self, batch: Any) -> None:
        (x,) = batch
        x = self.base(x) + 0.01 * torch.randn_like(x)  # global RNG, restored by savegame
        loss = (self.model(x) - 0.5).square().mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def reference(total: int) -> dict[str, torch.Tensor]:
    """The uninterrupted run (no workers, no checkpointer): the parameters after ``total`` steps."""
    run = Run()
    step = 0
    while step < total:
        for batch in run.loader:
            run.train_step(batch)
            step += 1
            if step >= total:
                break
        else:
            run.extras["epoch"] += 1
    return run.params()
