"""An Accelerate training loop whose save_state/load_state go through savegame (seconds on a CPU).

    python examples/accelerate_train.py                 # 60 steps, saving every 10
    python examples/accelerate_train.py --kill-at 33    # SIGKILLs itself at step 33 ...
    python examples/accelerate_train.py                 # ... and this resumes at step 30, exactly

(Saves are async by default: a kill while step 30's save is still being written resumes from
the checkpoint before it, as exactly. The same script runs under ``torchrun --nproc-per-node 2``
(DDP, gloo on CPU): every rank resumes its own share; docs/integrations-hf.md.)

The lines savegame adds are marked. ``accelerator.save_state()``/``load_state()`` write and read
a savegame checkpoint (safetensors + JSON manifest, every hash checked; no pickle), with the
objects given to ``register_for_checkpointing`` included. See docs/integrations-hf.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg
from savegame.integrations.accelerate import DirectRandomSampler, attach


class RunningMean:
    """Something of your own to checkpoint: register_for_checkpointing takes it (state_dict)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, sd: dict[str, float]) -> None:
        self.total, self.count = float(sd["total"]), int(sd["count"])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", default="runs/accelerate")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-at", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.steps)
    # A loader whose position is restored directly (no replay of the epoch so far):
    loader = StatefulDataLoader(
        data,
        batch_size=16,
        sampler=DirectRandomSampler(data, seed=0),
        generator=torch.Generator().manual_seed(1),
    )
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)
    )
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    mean = RunningMean()
    acc.register_for_checkpointing(mean)

    # ---- savegame: attach, then load_state() resumes from the newest valid checkpoint (or 0)
    ckpt = attach(acc, a.run, save=sg.Every(steps=10), keep=sg.Keep(last=2))
    step = acc.load_state()
    print(f"starting at step {step}")
    while step < a.steps:
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            mean.total, mean.count = mean.total + loss.item(), mean.count + 1
            step += 1
            if step == a.kill_at:
                print(f"SIGKILL at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt.step(step)  # ---- savegame: saves on the schedule; SIGTERM -> save, exit 75
            if step == a.steps:
                break
    acc.save_state()  # ---- savegame: a final checkpoint
    ckpt.close()
    h = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(model.state_dict().items())))
    print(
        f"finished at step {step}; mean loss {mean.total / mean.count:.6f}; parameters sha256 {h.hexdigest()[:16]}"
    )


if __name__ == "__main__":
    main()
