"""A fine-tuning job (frozen base, trained head) saving every step into a cache with a remote
root that lags (each upload's begin sleeps). argv: remote cache out progress steps delay async.
Appends "start N" then each committed step to ``progress``; writes the final state to ``out``."""

from __future__ import annotations

import os
import sys
import time

import torch

import savegame as sg
from savegame.storage import as_store
from savegame.storage.faulty import FaultyStore


class Slow(FaultyStore):
    def __init__(self, inner, delay):
        super().__init__(inner)
        self.delay = delay

    def begin(self, name, final=None):
        time.sleep(self.delay)
        return super().begin(name, final)


def model_and_opt():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(128, 128), torch.nn.Tanh()]
    base = torch.nn.Sequential(*layers)
    for p in base.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(128, 4)
    model = torch.nn.Sequential(base, head)
    return model, torch.optim.Adam(head.parameters(), lr=1e-2)


def main() -> None:
    remote, cache, out, progress, steps, delay, async_save = sys.argv[1:8]
    torch.set_num_threads(1)
    model, opt = model_and_opt()
    state = sg.TrainState(model=model, optimizer=opt)
    root = Slow(as_store(remote), float(delay))
    deadline = time.monotonic() + 60
    while True:  # a killed writer's S3 lease expires after SAVEGAME_LEASE_SECONDS
        try:
            ck = sg.Checkpointer(
                root,
                cache=cache,
                save=sg.Every(steps=1),
                keep=sg.Keep(last=2),
                handle_signals=False,
                async_save=async_save == "1",
                upload_retry=sg.UploadRetry(attempts=5, first_delay=0.05, max_delay=0.2),
            )
            break
        except sg.LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    start = ck.restore(state)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, f"start {start}\n".encode())
    for step in range(start, int(steps)):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(16, 128, generator=g), torch.randn(16, 4, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ck.step(state, step + 1)
        os.write(fd, f"{step + 1}\n".encode())
    ck.close()
    flat = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            flat[f"opt/{i}/{k}"] = torch.as_tensor(v)
    torch.save(flat, out)
    os.write(fd, b"done\n")


if __name__ == "__main__":
    main()
