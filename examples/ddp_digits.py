"""DDP training on scikit-learn's bundled digits (no download), checkpointed with savegame.

Run (CPU, gloo; any number of ranks)::

    torchrun --nproc-per-node 2 examples/ddp_digits.py --ckpt-dir runs/ddp-digits

On GPUs add ``--backend nccl`` (one GPU per rank: ``LOCAL_RANK`` picks it; the model, its
gradients' all-reduce and every batch live there, and savegame saves each rank's CUDA RNG too).

Interrupt it (Ctrl-C, or kill a rank) and run the same command again: it resumes from the
newest complete checkpoint, bit-exact. Tensors equal on every rank (the DDP model and optimizer)
are written once, by rank 0; those that differ (each rank's RNG stream and data-loader position)
are kept per rank (docs/distributed.md). Keys are the bare module's, so the checkpoint also
loads into the unwrapped model (``per_rank="fresh"`` in a single process).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-dir", default="runs/ddp-digits")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args()

    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)  # savegame coordinates on its own gloo group
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = StatefulDataLoader(data, batch_size=32, sampler=sampler)

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 10)
    )
    model = model.to(device)
    ids = [device.index] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    extras = {"epoch": 0}
    torch.manual_seed(1 + rank)  # per-rank stream (dropout): checkpointed per rank

    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
    with sg.Checkpointer(args.ckpt_dir, save=sg.Every(steps=20), keep=sg.Keep(last=2)) as ckpt:
        step = ckpt.restore(state)  # every rank; 0 on a fresh run
        if rank == 0 and step:
            print(f"resumed at step {step}, epoch {extras['epoch']}")
        while extras["epoch"] < args.epochs:
            sampler.set_epoch(extras["epoch"])  # before iter(): a restored loader resumes mid-epoch
            correct = seen = 0
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                logits = model(xb)
                loss = torch.nn.functional.cross_entropy(logits, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
                ckpt.step(state, step)  # every rank; rank 0 decides, all ranks save together
            extras["epoch"] += 1
            acc = torch.tensor([correct, seen], dtype=torch.float64, device=device)
            dist.all_reduce(acc)
            if rank == 0:
                print(
                    f"epoch {extras['epoch']}: train acc {acc[0] / max(acc[1], 1):.3f} (step {step})"
                )
        ckpt.save(state, step)
    dist.destroy_process_group()
    if rank == 0:
        print(f"done; checkpoints in {os.path.abspath(args.ckpt_dir)}")


if __name__ == "__main__":
    main()
