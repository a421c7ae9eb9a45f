"""Ranks for restore's overrides under torch.distributed (issue 13); started by
``_launch.launch(..., worker=OVERRIDES)``. Phase "save" trains a DDP model a step and saves it;
phase "resume" restores it with ``only=``, a misspelt name and ``strict=False`` onto a model
with an added layer, and reports what each rank saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _worker import destroying_after, fork_ranks

import savegame as sg


def build(*widths: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0 if len(widths) == 3 else 7)  # same weights on every rank
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers[:-1]))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def main() -> None:
    args = json.loads(sys.argv[2])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.environ['SG_TEST_STORE']}",
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    rank = dist.get_rank()
    out = Path(args["out"])
    model, opt = build(3, 4, 2)
    extras: dict[str, Any] = {"epoch": 1}
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    ckpt = sg.Checkpointer(args["root"], handle_signals=False)
    report: dict[str, Any] = {}
    if args["phase"] == "save":
        torch.manual_seed(100 + rank)
        model(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        ckpt.save(state, 1)
        if rank == 0:
            torch.save(model.module.state_dict(), out / "saved.pt")
    else:
        extras["epoch"] = 0
        assert ckpt.restore(state, only=["model"]) == 1
        report["only"] = dataclasses.asdict(ckpt.last_restore)  # type: ignore[arg-type]
        report["opt_state_empty"] = not opt.state
        report["epoch"] = extras["epoch"]
        if rank == 0:
            torch.save(model.module.state_dict(), out / "restored.pt")
        try:
            ckpt.restore(state, skip=["optimiser"])
        except sg.RestoreError as exc:
            report["typo"] = str(exc)
        bigger, opt2 = build(3, 4, 4, 2)  # an added layer
        surgery = sg.TrainState(model=bigger, optimizer=opt2, extras=extras)
        assert ckpt.restore(surgery, strict=False) == 1
        report["surgery"] = dataclasses.asdict(ckpt.last_restore)  # type: ignore[arg-type]
        report["layer0_equal"] = bool(torch.equal(bigger.module[0].weight, model.module[0].weight))
        (out / f"report-{rank}.json").write_text(json.dumps(report))
    ckpt.close()


if __name__ == "__main__":
    fork_ranks(int(sys.argv[3]), destroying_after(main))
