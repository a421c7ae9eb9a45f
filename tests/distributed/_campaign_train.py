"""One training job of the kill-and-resume campaign, started by ``torchrun`` (test_campaign.py).

It follows docs/distributed.md as written: build the objects, ``restore``, then per epoch
``sampler.set_epoch(extras["epoch"])`` and iterate, ``ckpt.step`` after every optimizer step.
DDP with BatchNorm (``broadcast_buffers`` on or off) or FSDP2 with BatchNorm; per-rank data
(DistributedSampler), dropout from per-rank RNG streams. At the end every rank writes its
whole final state to ``out/final-<tag>-<rank>.pt``; rank 0 writes its progress (completed
steps) to ``out/progress-<tag>`` after every step so the harness can kill at a chosen point.

Usage: torchrun --nproc-per-node 2 _campaign_train.py '<json args>'
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

FEATURES = 8


def build(kind: str, broadcast_buffers: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 3),
    )
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[4]):
            fully_shard(layer)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)


def full(v: Any) -> Any:
    if hasattr(v, "full_tensor"):  # a DTensor (FSDP2): every rank takes part
        v = v.full_tensor()
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def final_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    out: dict[str, Any] = {f"model/{k}": full(v) for k, v in inner.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"optimizer/{idx}/{name}"] = full(v)
    out["rng/torch"] = torch.get_rng_state()
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args["out"])
    tag = args["tag"]

    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, FEATURES, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = StatefulDataLoader(data, batch_size=8, sampler=sampler)

    model = build(args["kind"], bool(args.get("broadcast_buffers", True)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # after build(): per-rank dropout streams
    extras: dict[str, Any] = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
    ckpt = sg.Checkpointer(
        args["root"],
        save=sg.Every(steps=args["every"]),
        keep=sg.Keep(last=2),
        handle_signals=False,
        async_save=bool(args.get("async_save")),
    )
    step = ckpt.restore(state)
    progress = out / f"progress-{tag}"
    while extras["epoch"] < args["epochs"]:
        sampler.set_epoch(extras["epoch"])  # after restore, before iterating (docs/distributed.md)
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if rank == 0:
                tmp = progress.with_suffix(".tmp")
                tmp.write_text(str(step))
                os.replace(tmp, progress)
            ckpt.step(state, step)
            time.sleep(float(args.get("step_sleep", 0.0)))
        extras["epoch"] += 1
    ckpt.wait()
    final = final_state(model, opt)
    final["step"] = torch.tensor(step)
    torch.save(final, out / f"final-{tag}-{rank}.pt")
    ckpt.close()


if __name__ == "__main__":
    main()  # its locals (DDP's reducer, FSDP's state) are freed before the group is destroyed
    gc.collect()
    dist.destroy_process_group()
