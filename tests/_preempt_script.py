"""Training script for tests/test_preemption_group.py (run as a subprocess, never collected).

Usage: python _preempt_script.py ROOT TOTAL_STEPS STEP_SECONDS TRACE CONTEXT PERSISTENT

A small MLP with dropout trained from a shuffled two-worker ``StatefulDataLoader`` over a dataset
that draws random noise per item; the Checkpointer handles preemption signals (the default) and
saves only on a signal or at the end. Each step sleeps STEP_SECONDS, so that a signal sent by the
test lands mid-run. Appends ``step ids`` lines to TRACE and prints ``step N`` after every step;
CONTEXT is the workers' start method ("default", "fork", "spawn", "forkserver"); PERSISTENT is
0 or 1. At TOTAL_STEPS it saves a final checkpoint that the test compares bitwise.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

SAMPLES, BATCH = 48, 4  # 12 batches per epoch


class Noisy(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item()])


def main() -> None:
    root, total, pause, trace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    context, persistent = sys.argv[5], sys.argv[6] == "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loader = StatefulDataLoader(
        sg.data.resumable(Noisy()),
        batch_size=BATCH,
        shuffle=True,
        num_workers=2,
        persistent_workers=persistent,
        multiprocessing_context=None if context == "default" else context,
    )
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = sg.TrainState(model=model, optimizer=opt, loader=loader)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=10**9), keep=sg.Keep(last=5))
    step = ckpt.restore(state)
    print(f"resumed {step}", flush=True)
    with open(trace, "a") as out:
        while step < total:
            for x in loader:
                loss = (model(x / torch.tensor([SAMPLES, 1.0])) - 0.5).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                out.write(f"{step} {[int(i) for i in x[:, 0]]}\n")
                out.flush()
                time.sleep(pause)
                print(f"step {step}", flush=True)
                ckpt.step(state, step)  # saves here after a signal, then exits with 75
                if step >= total:
                    break
    ckpt.save(state, total)
    ckpt.close()


if __name__ == "__main__":
    main()
