"""Ranks for the incremental-save scenario (issue 14 part 2 under torch.distributed); started by
``_launch.launch(..., worker=INCREMENTAL)``. Phase "save": a frozen model (equal on every rank,
stored once), a per-rank tensor that never changes and one that changes at every step; saves at
steps 1-4 with Keep(last=2). Phase "resume": restores and reports what came back.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from _worker import fork_ranks

import savegame as sg


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
    torch.manual_seed(0)
    frozen = torch.nn.Linear(64, 64)
    extras = {
        "mine": torch.full((256,), float(rank + 1)),  # differs by rank, never changes
        "moving": torch.zeros(16),  # differs by rank, changes every step
    }
    state = sg.TrainState(frozen=frozen, extras=extras, rng=False)
    ckpt = sg.Checkpointer(
        args["root"], save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    )
    report: dict[str, object] = {}
    if args["phase"] == "save":
        for step in range(1, 5):
            extras["moving"] = torch.full((16,), float(100 * rank + step))
            ckpt.step(state, step)
    else:
        torch.manual_seed(5)
        frozen2 = torch.nn.Linear(64, 64)
        got = {"mine": torch.zeros(256), "moving": torch.zeros(16)}
        report["restored"] = ckpt.restore(sg.TrainState(frozen=frozen2, extras=got, rng=False))
        report["frozen_equal"] = bool(torch.equal(frozen2.weight, frozen.weight))
        report["mine"] = float(got["mine"][0])
        report["moving"] = float(got["moving"][0])
    ckpt.close()
    Path(args["out"], f"report-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    fork_ranks(int(sys.argv[3]), main)
