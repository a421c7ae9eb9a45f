"""Ranks for the damaged-checkpoint scenario (issue 9.8 under torch.distributed); started by
``_launch.launch(..., worker=DAMAGED)``. Phase "save" writes steps 1 and 2; phase "resume"
restores (the test damaged step 2 in between), saves step 2 again and reports.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
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
    extras = {"w": torch.zeros(64), "rank_only": torch.full((4,), float(rank))}
    state = sg.TrainState(rng=False, extras=extras)
    ckpt = sg.Checkpointer(args["root"], keep=sg.Keep(last=2), handle_signals=False)
    report: dict[str, object] = {}
    if args["phase"] == "save":
        for step in (1, 2):
            extras["w"].fill_(float(step))
            # changes every step, so each rank's file of step 2 holds data of its own (an
            # incremental save refers to unchanged tensors and writes no bytes for them)
            extras["rank_only"].fill_(float(rank + 10 * step))
            ckpt.save(state, step)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report["restored"] = ckpt.restore(state)
        report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, sg.CorruptCheckpointWarning)]
        report["w"] = float(extras["w"][0])
        report["rank_only"] = float(extras["rank_only"][0])
        extras["w"].fill_(2.0)
        ckpt.save(state, 2)  # the damaged step 2 must not be in the way
        report["saved"] = True
    ckpt.close()
    Path(args["out"], f"report-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    fork_ranks(int(sys.argv[3]), main)
