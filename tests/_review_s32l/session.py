"""One training session on a run folder, for the S32L review's restart tests.

usage: python session.py RUN SAVES [--wait-go]

Imports torch and savegame, then (with --wait-go) waits for a line on stdin, opens a
Checkpointer on RUN, restores, saves SAVES steps (one per step), prints "saved <step>" and
sleeps without closing: the parent ends it with SIGKILL (a session that ended without close()).
"""

from __future__ import annotations

import sys
import time

import torch

import savegame as sg


def main() -> None:
    run, saves = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"head": torch.nn.Linear(4, 4)})  # the test's _tiny_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    if "--wait-go" in sys.argv:
        print("ready", flush=True)
        sys.stdin.readline()
    ckpt = sg.Checkpointer(
        run,
        save=sg.Every(steps=1),
        keep=sg.Keep(last=2, best=1, monitor="val_loss", mode="min"),
    )
    step = ckpt.restore(state)
    for _ in range(saves):
        with torch.no_grad():
            model["head"].bias.add_(1.0)
        step += 1
        ckpt.step(state, step, metrics={"val_loss": 1.0 / step})
    print(f"saved {step}", flush=True)
    time.sleep(600)  # never closes: SIGKILLed by the parent


if __name__ == "__main__":
    main()
