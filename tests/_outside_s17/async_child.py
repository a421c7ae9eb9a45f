"""Child for tests/test_outside_s17_saves.py: async saves and the process's end.

usage: async_child.py ROOT SCENARIO
  noclose   save_async(2) with a slow commit, then the interpreter exits without close()
  sigterm   save_async(2) with a slow commit, SIGTERM to itself while it is in flight, then
            step(3): should save 3 and exit 75
  sigint    the same with SIGINT
  train     an endless training loop, an async save every step with a slow commit; prints
            ``SNAP <step> <hash>`` once save_async returned and ``COMMITTED <step>`` once a
            save's handle resolved (the parent kill -9s it)
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

import torch

import savegame as sg
from savegame.storage.local import LocalStore


class SlowCommitStore(LocalStore):
    """A local folder whose commit (manifest write) waits ``delay`` seconds first: a save stays
    in flight long enough for the test to act while it is in the background."""

    delay = 1.0

    def begin(self, name, final=None):  # type: ignore[no-untyped-def]
        staging = super().begin(name, final)
        seal = staging.seal
        delay = self.delay

        def slow_seal(*args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(delay)
            return seal(*args, **kwargs)

        staging.seal = slow_seal  # type: ignore[method-assign]
        return staging


def digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for t in list(model.state_dict().values()):
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(16, 256)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def main() -> None:
    root, scenario = sys.argv[1], sys.argv[2]
    model, opt = build()
    state = sg.TrainState(model=model, optimizer=opt, extras={"n": 0})
    store = SlowCommitStore(root)
    if scenario == "train":
        SlowCommitStore.delay = 0.15
        ckpt = sg.Checkpointer(store, save=sg.Every(steps=1), keep=sg.Keep(last=3), async_save=True)
        step = ckpt.restore(state)
        pending = None
        while True:
            train_step(model, opt)
            step += 1
            state["extras"]["n"] = step
            before = digest(model, opt)
            handle = ckpt.save_async(state, step)
            if pending is not None and pending.done():
                print(f"COMMITTED {pending.step}", flush=True)
            print(f"SNAP {step} {before}", flush=True)
            pending = handle
    ckpt = sg.Checkpointer(store, save=sg.Every(steps=100), async_save=True)
    ckpt.save(state, 1)
    train_step(model, opt)
    print(f"SNAP 2 {digest(model, opt)}", flush=True)
    handle = ckpt.save_async(state, 2)
    assert handle is not None and not handle.done()
    if scenario == "noclose":
        print("EXITING", flush=True)
        sys.exit(0)  # no close(): the daemon worker dies with the interpreter
    os.kill(os.getpid(), signal.SIGTERM if scenario == "sigterm" else signal.SIGINT)
    time.sleep(0.05)
    train_step(model, opt)
    print(f"SNAP 3 {digest(model, opt)}", flush=True)
    ckpt.step(state, 3)  # the signal's save: blocks, then SystemExit(75)
    print("NOT EXITED", flush=True)
    ckpt.close()


if __name__ == "__main__":
    main()
