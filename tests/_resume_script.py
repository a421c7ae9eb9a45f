"""Training script for tests/test_exact_resume.py (run as a subprocess, never collected).

Usage: python _resume_script.py ROOT TOTAL_STEPS KILL_AT TRACE

A small MLP with dropout, AdamW, warm-up + cosine LR, a shuffled StatefulDataLoader with two
workers over a dataset whose ``__getitem__`` draws torch, numpy and python random numbers.
Saves every 4 steps; with KILL_AT > 0 it SIGKILLs itself right after ``ckpt.step`` of that
step. Appends ``step loss-hex`` lines to TRACE, and at TOTAL_STEPS saves a final checkpoint
that the test compares bitwise.
"""

from __future__ import annotations

import os
import random
import signal
import sys

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

SAVE_EVERY = 4
BATCH = 8
SAMPLES = 48  # 6 batches per epoch


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(SAMPLES, 8, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.1 * torch.randn(8)
        scale = float(np.random.uniform(0.9, 1.1))
        flip = -1.0 if random.random() < 0.2 else 1.0
        return flip * scale * self.x[i] + noise, self.y[i]


def main() -> None:
    root, total, kill_at, trace = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - 3)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[3])
    loader = StatefulDataLoader(
        sg.data.resumable(Augmented()), batch_size=BATCH, shuffle=True, num_workers=2
    )
    extras = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras=extras)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=SAVE_EVERY), keep=sg.Keep(last=2))
    step = ckpt.restore(state)
    print(f"resumed {step}", flush=True)
    steps_per_epoch = len(loader)
    with open(trace, "a") as out:
        while step < total:
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                epoch_end = step % steps_per_epoch == 0
                if epoch_end:
                    extras["epoch"] += 1
                out.write(
                    f"{step} {loss.item().hex()} {x.sum().item().hex()} {float(opt.param_groups[0]['lr']).hex()}\n"
                )
                out.flush()
                ckpt.step(state, step, epoch_end=epoch_end)
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step >= total:
                    break
    ckpt.save(state, total)
    ckpt.close()


if __name__ == "__main__":
    main()
