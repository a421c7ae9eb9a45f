"""FSDP2 (``fully_shard``) on a toy regression, checkpointed with savegame.

Run (CPU, gloo)::

    torchrun --nproc-per-node 2 examples/fsdp_toy.py --ckpt-dir runs/fsdp-toy

Each rank writes only its own shards (parameters and Adam moments), all ranks in parallel; the
manifest records every chunk's global offset, so the run resumes on another number of ranks::

    torchrun --nproc-per-node 1 examples/fsdp_toy.py --ckpt-dir runs/fsdp-toy --reshard

On GPUs add ``--backend nccl`` (one GPU per rank, picked by ``LOCAL_RANK``).

(``--reshard`` passes ``per_rank="fresh"``: per-rank RNG streams cannot be mapped onto a different
number of ranks, so they are left as seeded; see docs/distributed.md.) For inference, turn the
sharded checkpoint into a single-rank one::

    python -c "import savegame.distributed as d; d.consolidate('runs/fsdp-toy/step-000000000060', 'model-full')"
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import savegame as sg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-dir", default="runs/fsdp-toy")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reshard", action="store_true")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args()

    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    model = model.to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    true_w = torch.randn(16, 1).to(device)
    torch.manual_seed(100 + rank)  # each rank draws its own batches

    state = sg.TrainState(model=model, optimizer=opt, extras={"note": "toy"})
    with sg.Checkpointer(args.ckpt_dir, save=sg.Every(steps=20), keep=sg.Keep(last=2)) as ckpt:
        start = ckpt.restore(state, per_rank="fresh" if args.reshard else "strict")
        for step in range(start, args.steps):
            x = torch.randn(32, 16).to(device)  # drawn on the CPU: the same batches on any device
            loss = torch.nn.functional.mse_loss(model(x), x @ true_w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(state, step + 1)
            if rank == 0 and (step + 1) % 20 == 0:
                print(f"step {step + 1}: loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
