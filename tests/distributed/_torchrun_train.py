"""One rank of a DDP job under real ``torchrun`` (gloo, CPU), for test_torchrun_resume.py.

Usage: torchrun --nproc-per-node 2 _torchrun_train.py ROOT OUT TAG TOTAL PAUSE WORKERS

The loop is the one docs/distributed.md shows: ``ckpt.restore(state)``, then
``sampler.set_epoch(extras["epoch"])``, then ``for batch in loader``, with a
``DistributedSampler`` inside a ``StatefulDataLoader`` with WORKERS workers, dropout (per-rank
torch RNG) and per-item noise drawn in the workers. Saves every 3 steps and on a preemption
signal. Appends ``step ids`` lines to OUT/ids-TAG-RANK.txt, prints ``rank R step S`` after each
step, sleeps PAUSE seconds per step, and at TOTAL writes its parameters to
OUT/params-TAG-RANK.pt. Whatever ends it through ``SystemExit`` (the preemption exit, 75) is
recorded in OUT/exit-TAG-RANK.txt, since torchrun does not report a rank's status once it is
itself signalled.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

SAMPLES, BATCH = 40, 4  # 2 ranks: 20 samples, 5 batches per rank and epoch


class Ids(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item()])


def main(root: str, out: Path, tag: str, total: int, pause: float, workers: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # per-rank dropout stream
    ds = Ids()
    sampler = DistributedSampler(ds, shuffle=True, seed=5)
    loader = StatefulDataLoader(
        sg.data.resumable(ds), batch_size=BATCH, sampler=sampler, num_workers=workers
    )
    extras = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=3), keep=sg.Keep(last=3))
    step = ckpt.restore(state)
    with open(out / f"ids-{tag}-{rank}.txt", "a") as trace:
        while step < total:
            sampler.set_epoch(extras["epoch"])  # after restore, before iterating
            for x in loader:
                loss = (model(x / torch.tensor([SAMPLES, 1.0])) - 0.5).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                trace.write(f"{step} {[int(i) for i in x[:, 0]]}\n")
                trace.flush()
                time.sleep(pause)
                # One write per line: both ranks share the pipe, and print() writes the text and
                # its newline separately (on unbuffered stdout, two writes another rank can split).
                sys.stdout.write(f"rank {rank} step {step}\n")
                sys.stdout.flush()
                ckpt.step(state, step)
                if step >= total:
                    break
            else:
                extras["epoch"] += 1
    ckpt.close()
    torch.save([p.detach().clone() for p in model.parameters()], out / f"params-{tag}-{rank}.pt")


if __name__ == "__main__":
    a = sys.argv[1:]
    out_dir = Path(a[1])
    try:
        main(a[0], out_dir, a[2], int(a[3]), float(a[4]), int(a[5]))
        # main's locals (DDP's reducer) are freed before the group is destroyed (_worker.py)
        gc.collect()
        dist.destroy_process_group()
    except SystemExit as exc:
        (out_dir / f"exit-{a[2]}-{os.environ['RANK']}.txt").write_text(str(exc.code))
        raise
