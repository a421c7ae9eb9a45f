"""Writes the savegame format-version-2 fixture (incremental checkpoints): run once, commit the
output. ``python tests/golden/savegame_v2/make_golden.py``

A run saved at steps 3, 4 and 5 with ``Keep(last=1)``: a frozen first layer and a trained second
one. Step 3 is a full (version 1) checkpoint; 4 and 5 refer to its file for the frozen layer;
retention deleted 3 and 4, so step 3's file survives as
``retired-step-000000000003-rank-00000.safetensors`` and ``step-000000000005`` is version 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import savegame as sg

HERE = Path(__file__).resolve().parent
RUN = HERE / "run"


def build() -> tuple[sg.TrainState, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return sg.TrainState(model=model, optimizer=opt, rng=False), model, opt


def main() -> None:
    shutil.rmtree(RUN, ignore_errors=True)
    state, model, opt = build()
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with sg.Checkpointer(RUN, keep=sg.Keep(last=1), handle_signals=False) as ck:
        for step in (3, 4, 5):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            ck.save(state, step)
    (RUN / ".lock").unlink(missing_ok=True)
    values = {k: [float(v).hex() for v in t.reshape(-1).tolist()] for k, t in model.state_dict().items()}
    (HERE / "expected_values.json").write_text(json.dumps({"step": 5, "model": values}, indent=1) + "\n")


if __name__ == "__main__":
    main()
