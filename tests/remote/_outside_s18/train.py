"""A preemptible-VM training job on an s3:// run with a local cache (review S18).

argv: URL CACHE OUT LOG STEPS [MODE]
- Retries LockedError (a killed predecessor's lease expires after SAVEGAME_LEASE_SECONDS).
- LOG gets "start N", then "step S idx,idx,..." (the batch's sample ids) after each step.
- At the end OUT (torch.save of tensors only) holds model, optimizer, scheduler, every RNG's next
  draw; then "done" is logged.
MODE "signals": handle_signals=True (SIGTERM -> save, exit 75); default: handle_signals=False.
"""
import os
import random
import sys
import time

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

url, cache, out, log, steps = sys.argv[1:6]
mode = sys.argv[6] if len(sys.argv) > 6 else ""
steps = int(steps)
torch.set_num_threads(1)
torch.manual_seed(0)
random.seed(0)
np.random.seed(0)


class Aug(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(96, 8, generator=g)
        self.y = torch.randn(96, 4, generator=g)

    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int):
        noise = torch.randn(8) * 0.1 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        return self.x[i] + noise, self.y[i], i


model = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Dropout(0.2), torch.nn.Tanh(),
                            torch.nn.Linear(256, 4))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
loader = StatefulDataLoader(sg.data.resumable(Aug()), batch_size=16, shuffle=True, num_workers=0)
extras = {"epoch": 0}
state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras=extras)
signals = mode == "signals"
deadline = time.monotonic() + 90
while True:
    try:
        ckpt = sg.Checkpointer(url, cache=cache, save=sg.Every(steps=3), keep=sg.Keep(last=2),
                               handle_signals=signals, async_save=True,
                               upload_retry=sg.UploadRetry(attempts=3, first_delay=0.2, max_delay=1.0))
        break
    except sg.LockedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
try:
    step = ckpt.restore(state)
    os.write(fd, f"start {step}\n".encode())
    while step < steps:
        for x, y, idx in loader:
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            os.write(fd, f"step {step} {','.join(str(int(i)) for i in idx)}\n".encode())
            ckpt.step(state, step)
            if mode == "slow":
                time.sleep(0.05)
            if step >= steps:
                break
        else:
            extras["epoch"] += 1
    ckpt.save(state, step)
finally:
    ckpt.close()
flat = {f"model/{k}": v for k, v in model.state_dict().items()}
for i, s in opt.state_dict()["state"].items():
    for k, v in s.items():
        flat[f"opt/{i}/{k}"] = torch.as_tensor(v)
flat["lr"] = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)
flat["rng/torch"] = torch.rand(4)
flat["rng/numpy"] = torch.from_numpy(np.random.rand(4))
flat["rng/python"] = torch.tensor([random.random() for _ in range(4)], dtype=torch.float64)
flat["epoch"] = torch.tensor(extras["epoch"])
torch.save(flat, out)
os.write(fd, b"done\n")
