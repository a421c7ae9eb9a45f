"""The user's training loop for tests/test_review_s32_filesystems.py (README "Use it"), shared by
the test file (imported by path) and run as a child process that is SIGKILLed mid-save.

usage (child): loop.py ROOT STOP MODE POINT N
    Trains to step STOP with ``Every(steps=1)``, ``Keep(last=2)``; MODE is ``sync`` or ``async``
    (``-full`` appended: ``incremental=False``). After step 3 is committed, the N-th call of
    ``os.POINT`` (``fsync``, ``rename``, ``replace``, ``mkdir``, ``open``) kills the process
    with SIGKILL before it runs. Prints ``committed S`` once step S is on disk.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg


def build(seed: int = 0) -> sg.TrainState:
    """A tiny model with a frozen base (incremental saves share its bytes), dropout (the RNG
    matters), Adam, a scheduler and a shuffling stateful loader: 20 samples, 5 batches/epoch."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Dropout(0.25), torch.nn.Linear(8, 2)
    )
    model[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g))
    loader = StatefulDataLoader(data, batch_size=4, shuffle=True)
    return sg.TrainState(
        model=model, optimizer=opt, scheduler=sched, loader=loader, extras={"epoch": 0}
    )


def train(
    state: sg.TrainState,
    start: int,
    stop: int,
    ckpt: sg.Checkpointer | None = None,
    on_step: Any = None,
) -> int:
    """README's loop from step ``start`` to ``stop``: ``ckpt.step`` after each optimizer step."""
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    loader, extras = state["loader"], state["extras"]
    step = start
    while step < stop:
        for x, y in loader:
            model.train()
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            step += 1
            if ckpt is not None:
                ckpt.step(state, step)
            if on_step is not None:
                on_step(step)
            if step == stop:
                break
        else:
            extras["epoch"] += 1
    return step


def fingerprint(state: sg.TrainState) -> dict[str, Any]:
    """Everything a resume must bring back, as bytes: model, optimizer moments, scheduler,
    extras, the loader's position and the RNG."""

    def b(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
        t = t.detach().contiguous().cpu()
        return (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return b(x)
        if isinstance(x, dict):
            return {str(k): walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        return x

    return {
        "model": walk(state["model"].state_dict()),
        "optimizer": walk(state["optimizer"].state_dict()),
        "scheduler": walk(state["scheduler"].state_dict()),
        "loader": walk(state["loader"].state_dict()),
        "extras": walk(dict(state["extras"])),
        "rng": b(torch.get_rng_state()),
    }


def _arm(point: str, n: int) -> None:
    real = getattr(os, point)
    calls = [0]

    def trap(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, point, trap)


def main() -> None:
    root, stop, mode, point, n = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    state = build()
    ckpt = sg.Checkpointer(
        root,
        save=sg.Every(steps=1),
        keep=sg.Keep(last=2),
        async_save=mode.startswith("async"),
        incremental=not mode.endswith("-full"),
        handle_signals=False,
    )
    start = ckpt.restore(state)

    def on_step(step: int) -> None:
        if step <= 3:
            ckpt.wait()
            print(f"committed {step}", flush=True)
        if step == 3:
            _arm(point, n)

    train(state, start, stop, ckpt, on_step)
    ckpt.close()
    print("finished", flush=True)


if __name__ == "__main__":
    main()
