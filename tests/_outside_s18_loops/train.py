"""A plain PyTorch training script, as a user writes it, killed for real by the s18 tests.

argv: root total variant trace kill async
  variant: "sgd" (two optimizers SGD+Adam, SequentialLR, LambdaLR closure, SWA + SWALR,
           hand EMA, zero_grad(set_to_none=False)) or "amp" (GradScaler + bf16 autocast,
           OneCycleLR, ChainedScheduler)
  kill: "none" | "step:K" (after ckpt.step at step K) | "micro:K:M" (after M micro-batches of
        step K) | "fsync:K:N" (at the N-th fsync of the save of step K) | "rename:K" /
        "renamed:K" (just before / after a rename during the save of step K) | "term:K:M"
        (SIGTERM to the process group after M micro-batches of step K)
"""

import copy
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler, random_split
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

root, total, variant, trace, kill, use_async = sys.argv[1:7]
total = int(total)
use_async = use_async == "1"
kind, *kargs = kill.split(":")
kargs = [int(a) for a in kargs]

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)  # once, at the top: dropout, noise and the workers' seeds all come from it
np.random.seed(0)
random.seed(0)

# --- the kill hooks (a real SIGKILL inside a save) ---------------------------------------
saving = {"step": None, "fsyncs": 0}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


_fsync, _rename, _replace = os.fsync, os.rename, os.replace


def fsync(fd):
    if kind == "fsync" and saving.get("armed"):
        saving["fsyncs"] += 1
        if saving["fsyncs"] == kargs[1]:
            die()
    return _fsync(fd)


def _renamer(real):
    def rename(src, dst, *a, **k):
        if saving["step"] is not None and saving["step"] == (kargs[0] if kargs else None):
            if kind == "rename" and ".tmp-step" in str(src):
                die()
            real(src, dst, *a, **k)
            if kind == "renamed" and ".tmp-step" in str(src):
                die()
            return None
        return real(src, dst, *a, **k)

    return rename


os.fsync, os.rename, os.replace = fsync, _renamer(_rename), _renamer(_replace)


# --- data ----------------------------------------------------------------------------------
class Aug(Dataset):
    def __init__(self) -> None:
        self.x = torch.randn(66, 6, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        flip = -1.0 if random.random() < 0.3 else 1.0  # python random
        scale = float(np.random.uniform(0.8, 1.2))  # numpy
        return flip * scale * self.x[i] + 0.05 * torch.randn(6), i  # torch


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class PairBatches(Sampler):
    """A user's own batch sampler: batches of `batch_size` from a sampler, drawn lazily."""

    def __init__(self, sampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size


full = Aug()
train_ds, aux_ds = random_split(full, [50, 16], generator=torch.Generator().manual_seed(3))
loader = StatefulDataLoader(
    sg.data.resumable(train_ds),
    batch_size=4,
    shuffle=True,
    num_workers=2,
    worker_init_fn=seed_worker,
    persistent_workers=True,
    prefetch_factor=3,
    generator=torch.Generator().manual_seed(5),
    drop_last=True,
)  # 50 samples: 12 batches, 2 dropped; 4 micro-batches a step -> 3 steps an epoch
weights = torch.linspace(0.2, 1.0, len(aux_ds))
if os.environ.get("S18_AUX") == "custom":  # a batch sampler of the user's own
    aux = StatefulDataLoader(
        aux_ds, batch_sampler=PairBatches(WeightedRandomSampler(weights, num_samples=10), 3)
    )
else:
    aux = StatefulDataLoader(
        aux_ds, sampler=WeightedRandomSampler(weights, num_samples=10), batch_size=3
    )

# --- model, optimizers, schedulers -------------------------------------------------------
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 6))
body, head = list(model[0].parameters()), list(model[3].parameters())
ema = copy.deepcopy(model)  # kept by hand
state_parts = {}
if variant == "sgd":
    opt_a = torch.optim.SGD(body, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    opt_b = torch.optim.Adam(head, lr=0.01)
    warm = 3

    def ramp(s):  # a closure over `warm`
        return min(1.0, (s + 1) / warm) * 0.97**s

    sched_a = torch.optim.lr_scheduler.SequentialLR(
        opt_a,
        [
            torch.optim.lr_scheduler.LinearLR(opt_a, 0.2, 1.0, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(opt_a, 0.95),
        ],
        milestones=[3],
    )
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, ramp)
    swa = torch.optim.swa_utils.AveragedModel(model)
    swa_sched = torch.optim.swa_utils.SWALR(opt_a, swa_lr=0.02, anneal_epochs=2)
    swa_start = total // 2
    state_parts = dict(swa=swa, swa_sched=swa_sched)
    scaler = None
else:
    opt_a = torch.optim.AdamW(body, lr=0.01)
    opt_b = torch.optim.RMSprop(head, lr=0.005, momentum=0.5)
    sched_a = torch.optim.lr_scheduler.OneCycleLR(opt_a, max_lr=0.05, total_steps=total)
    sched_b = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(opt_b, 0.5, total_iters=4),
            torch.optim.lr_scheduler.ExponentialLR(opt_b, 0.9),
        ]
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    state_parts = dict(scaler=scaler)

extras = {"epoch": 0, "ema_loss": 0.0, "best_loss": 1e9, "aux_seen": 0}
state = sg.TrainState(
    model=model,
    ema=ema,
    opt_a=opt_a,
    opt_b=opt_b,
    sched_a=sched_a,
    sched_b=sched_b,
    loader=loader,
    aux=aux,
    extras=extras,
    **state_parts,
)
ckpt = sg.Checkpointer(root, save=sg.Every(steps=2), keep=sg.Keep(last=3), async_save=use_async)
step = ckpt.restore(state)
print(f"resumed {step}", flush=True)

aux_it = iter(aux)


def next_aux():
    global aux_it
    try:
        return next(aux_it)
    except StopIteration:
        aux_it = iter(aux)
        return next(aux_it)


ACC = 4
with open(trace, "a") as out:
    while step < total:
        micro, ids, aux_ids = 0, [], []
        for x, i in loader:
            x = x + 0.01 * torch.randn_like(x)  # noise injection: the global torch RNG
            ax, ai = next_aux()
            aux_ids += ai.tolist()
            extras["aux_seen"] += len(ai)
            if variant == "amp":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = (model(x).float() - x).pow(2).mean() + 0.1 * model(ax).float().pow(
                        2
                    ).mean()
                scaler.scale(loss / ACC).backward()
            else:
                loss = (model(x) - x).pow(2).mean() + 0.1 * model(ax).pow(2).mean()
                (loss / ACC).backward()
            ids += i.tolist()
            micro += 1
            if kind == "micro" and step + 1 == kargs[0] and micro % ACC == kargs[1]:
                die()  # inside the accumulation window
            if kind == "term" and step + 1 == kargs[0] and micro % ACC == kargs[1]:
                # scancel-style, inside the accumulation window, from another process (the
                # workers honour a SIGTERM from their own loader's process: torch stops them so)
                import subprocess

                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import os, signal, sys; os.killpg(int(sys.argv[1]), signal.SIGTERM)",
                        str(os.getpgid(0)),
                    ],
                    check=False,
                    timeout=60,
                )
            if micro % ACC:
                continue
            if variant == "amp":
                scaler.step(opt_a)
                scaler.step(opt_b)
                scaler.update()
                sched_a.step()
                sched_b.step()
            else:
                opt_a.step()
                opt_b.step()
                if step + 1 > swa_start:
                    swa.update_parameters(model)
                    swa_sched.step()
                else:
                    sched_a.step()
                sched_b.step()
            opt_a.zero_grad(set_to_none=False)
            opt_b.zero_grad(set_to_none=False)
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters(), strict=False):
                    pe.mul_(0.9).add_(p, alpha=0.1)
            step += 1
            lv = loss.item()
            extras["ema_loss"] = 0.9 * extras["ema_loss"] + 0.1 * lv
            extras["best_loss"] = min(extras["best_loss"], lv)
            lrs = [g["lr"] for g in opt_a.param_groups + opt_b.param_groups]
            out.write(f"{step} {ids} {aux_ids} {lv.hex()} {[float(v).hex() for v in lrs]}\n")
            out.flush()
            ids, aux_ids = [], []
            end = micro == len(loader)
            saving["step"] = step
            if kind == "fsync" and step == kargs[0]:
                saving["armed"] = True  # an async save fsyncs in the background, after step()
            ckpt.step(state, step, epoch_end=end)
            saving["step"] = None
            if kind == "step" and step == kargs[0]:
                die()  # between the save (when step is a save step) and the next step
            if step >= total:
                break
        extras["epoch"] += 1
saving["step"] = None
ckpt.save(state, total)  # the README's final save, whatever the schedule
ckpt.close()
print("done", flush=True)
