"""A hyper-parameter sweep in one process: CYCLES trials, each Checkpointer(...) -> restore ->
a few step()/save() -> close(), sync and async, incremental or not, most on their own run
folder and every fifth on one shared folder. Prints one JSON line: resource snapshots before
the first Checkpointer, after WARM trials and at the end, and each trial's seconds.

usage: python sweep.py ROOT CYCLES WARM MODE   (MODE: mixed | async | sync)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import savegame as sg

sys.path.insert(0, os.path.dirname(__file__))
import probe  # noqa: E402


def trial(root: str, i: int, mode: str) -> None:
    torch.manual_seed(i)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = sg.TrainState(model=model, optimizer=opt, extras={"trial": i})
    async_save = {"mixed": i % 2 == 0, "async": True, "sync": False}[mode]
    folder = os.path.join(root, "shared" if i % 5 == 0 else f"trial-{i:04d}")
    with sg.Checkpointer(
        folder,
        save=sg.Every(steps=2),
        keep=sg.Keep(last=2),
        async_save=async_save,
        incremental=i % 3 != 0,
    ) as ckpt:
        step = ckpt.restore(state)
        for _ in range(2):
            loss = model(torch.randn(4, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            ckpt.step(state, step, metrics={"loss": float(loss.detach())})
        ckpt.save(state, step + 1)


def main() -> None:
    root, cycles, warm, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    before = probe.snapshot()
    times, warmed = [], None
    for i in range(cycles):
        t = time.perf_counter()
        trial(root, i, mode)
        times.append(time.perf_counter() - t)
        if i + 1 == warm:
            warmed = probe.snapshot()
    after = probe.snapshot()
    print(json.dumps({"before": before, "warm": warmed, "after": after, "times": times}))


if __name__ == "__main__":
    main()
