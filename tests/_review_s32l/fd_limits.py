"""File-descriptor limits, in a process of its own.

usage: python fd_limits.py ROOT MODE
  MODE=rlimit: RLIMIT_NOFILE=(64, 64); a state of 600 tensors (150 Linear layers + Adam),
      async saves, two sessions of 5 saves each. Prints JSON: each session's outcome, the
      steps committed and a checksum of the live parameters after each session.
  MODE=headroom: two such sessions without a limit; then the process opens
      every descriptor it may except FREE (0..7), then opens a Checkpointer, restores and
      saves. Prints JSON: per FREE and phase, "ok" or the exception's module.class.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

import savegame as sg

LAYERS = 150


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, sg.TrainState]:
    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(LAYERS)])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt, sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})


def train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


def sessions(root: str) -> dict:
    """Two sessions of 5 async saves each on ``root`` (the second resumes the first)."""
    out: dict = {"sessions": []}
    for _ in range(2):
        model, opt, st = build()
        try:
            with sg.Checkpointer(
                root, save=sg.Every(steps=1), keep=sg.Keep(last=2), async_save=True
            ) as ck:
                step = ck.restore(st)
                for _ in range(5):
                    train(model, opt)
                    step += 1
                    ck.step(st, step)
            res = "ok"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            res = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        out["sessions"].append(
            {
                "result": res,
                "step": step,
                "sum": float(sum(p.detach().double().sum() for p in model.parameters())),
            }
        )
    return out


def rlimit(root: str) -> dict:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    return sessions(root)


def hog(free: int) -> list[int]:
    held: list[int] = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for fd in held[len(held) - free :]:
        os.close(fd)
    return held[: len(held) - free]


def headroom(root: str) -> dict:
    made = sessions(root)  # the run: incremental checkpoints that share a file
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # quick to fill
    model, opt, st = build()
    with sg.Checkpointer(root, keep=sg.Keep(last=3), async_save=True) as ck:  # imports, warm-up
        step = ck.restore(st)
        ck.list()
    del ck
    results = []
    for free in range(8):
        for phase in ("restore", "save"):
            held = hog(free)
            ck = None
            try:
                ck = sg.Checkpointer(root, keep=sg.Keep(last=3), async_save=True)
                step = ck.restore(st)
                if phase == "save":
                    train(model, opt)
                    ck.save(st, step + 1)
                res = "ok"
            except Exception as exc:  # noqa: BLE001 - reported to the test
                res = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                try:
                    if ck is not None:
                        ck.close()
                except Exception as exc:  # noqa: BLE001
                    res += f" | close: {type(exc).__module__}.{type(exc).__name__}"
                for fd in held:
                    os.close(fd)
            results.append([free, phase, res])
    return {"made": made, "results": results}


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    print(json.dumps(rlimit(root) if mode == "rlimit" else headroom(root)))


if __name__ == "__main__":
    main()
