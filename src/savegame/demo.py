"""``savegame demo``: kill a training run with SIGKILL, resume it, and prove nothing changed.

Trains a small CNN on scikit-learn's bundled digits data set (no download) three ways, each in a
fresh process: (A) uninterrupted; (B) the same run, killed with a real ``SIGKILL`` part-way;
(C) a new process that resumes B's run folder. The demo then compares a hash of A's and C's
final parameters and optimizer state, and their metrics: they must be identical.

The worker (``python -m savegame.demo worker RUN``) prints one JSON object per line on stdout
(progress, then the result) so the parent can draw a progress bar and kill it at a chosen step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEPS = 200
SAVE_EVERY = 25
BATCH = 32


def _build(seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torchdata.stateful_dataloader import StatefulDataLoader

    import savegame as sg

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train_idx, val_idx = perm[:1500], perm[1500:]

    class Augmented(torch.utils.data.Dataset):  # random noise + shift: RNG drawn per sample
        def __len__(self) -> int:
            return len(train_idx)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            img = x[train_idx[i]]
            shift = random.choice((-1, 0, 1))
            img = torch.roll(img, shifts=shift, dims=2)
            img = img + 0.05 * torch.randn_like(img) + float(np.random.uniform(-0.02, 0.02))
            return img, y[train_idx[i]]

    loader = StatefulDataLoader(sg.data.resumable(Augmented()), batch_size=BATCH, shuffle=True, num_workers=0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.25), nn.Linear(64, 10),
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=20)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 20)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[20])
    return {"model": model, "opt": opt, "sched": sched, "loader": loader, "val": (x[val_idx], y[val_idx])}


def _evaluate(model: Any, val: tuple[Any, Any]) -> dict[str, float]:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(val[0])
        loss = torch.nn.functional.cross_entropy(logits, val[1]).item()
        acc = (logits.argmax(1) == val[1]).float().mean().item()
    model.train()
    return {"val_loss": loss, "val_acc": acc}


def _fingerprint(model: Any, opt: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    for pid, s in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(s.items()):
            h.update(f"{pid}/{k}".encode())
            h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(run: str) -> None:
    """Train to STEPS, resuming from ``run`` if it holds checkpoints. JSON lines on stdout."""
    import torch

    import savegame as sg

    torch.set_num_threads(1)  # same reduction order in every process: bitwise-reproducible
    parts = _build()
    model, opt, sched, loader = parts["model"], parts["opt"], parts["sched"], parts["loader"]
    extras: dict[str, Any] = {"epoch": 0}
    ckpt = sg.Checkpointer(run, save=sg.Every(steps=SAVE_EVERY), keep=sg.Keep(last=2, best=1, monitor="val_acc", mode="max"))
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras=extras)
    step = ckpt.restore(state)
    print(json.dumps({"event": "start", "step": step}), flush=True)
    metrics: dict[str, float] = {}
    while step < STEPS:
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            end_of_epoch = step % math.ceil(1500 / BATCH) == 0
            if end_of_epoch:
                extras["epoch"] += 1
                metrics = _evaluate(model, parts["val"])
            saved = ckpt.step(state, step, metrics=metrics if end_of_epoch else None, epoch_end=end_of_epoch)
            print(json.dumps({"event": "step", "step": step, "loss": round(loss.item(), 4), "saved": saved}), flush=True)
            if step >= STEPS:
                break
    metrics = _evaluate(model, parts["val"])
    ckpt.save(state, step, metrics=metrics)
    ckpt.close()
    print(json.dumps({"event": "done", "step": step, "hash": _fingerprint(model, opt), **metrics}), flush=True)


def _run_worker(run: Path, progress: Any, task: Any, kill_at: int | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "savegame.demo", "worker", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    last: dict[str, Any] = {}
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        last = msg
        if msg["event"] in ("start", "step"):
            progress.update(task, completed=msg["step"])
        if kill_at is not None and msg["event"] == "step" and msg["step"] >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"event": "killed", "step": msg["step"]}
    rc = proc.wait()
    if rc != 0 or last.get("event") != "done":
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"demo worker failed (exit {rc}):\n{err}")
    return last


def main(workdir: str | None = None) -> int:
    """Run the demo; returns 0 if the resumed run equals the uninterrupted one."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from savegame.checkpointer import list_run

    console = Console()
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="savegame-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    run_a, run_b = base / "uninterrupted", base / "interrupted"
    kill_at = random.Random().randint(SAVE_EVERY + 3, STEPS - SAVE_EVERY - 3)
    console.print(f"[bold]savegame demo[/]: a small CNN on scikit-learn's digits, {STEPS} steps, a checkpoint every {SAVE_EVERY} steps")
    console.print(f"run folders under {base}\n")
    t0 = time.perf_counter()
    cols = (TextColumn("{task.description:<34}"), BarColumn(), TextColumn("step {task.completed:>3.0f}/{task.total:.0f}"), TimeElapsedColumn())
    with Progress(*cols, console=console) as progress:
        ta = progress.add_task("A  uninterrupted", total=STEPS)
        a = _run_worker(run_a, progress, ta)
        tb = progress.add_task("B  interrupted (SIGKILL)", total=STEPS)
        killed = _run_worker(run_b, progress, tb, kill_at=kill_at)
        progress.update(tb, description=f"B  [red]SIGKILL near step {killed['step']}[/]")
        saved = [c.step for c in list_run(run_b) if c.valid]
        tc = progress.add_task(f"C  resume B from step {max(saved) if saved else 0}", total=STEPS)
        c = _run_worker(run_b, progress, tc)
    table = Table(title="uninterrupted vs killed-and-resumed")
    table.add_column("")
    table.add_column("A uninterrupted")
    table.add_column("B+C killed, resumed")
    same = a["hash"] == c["hash"] and a["val_acc"] == c["val_acc"] and a["val_loss"] == c["val_loss"]
    table.add_row("parameters + optimizer hash", a["hash"], c["hash"])
    table.add_row("val_acc", f"{a['val_acc']:.6f}", f"{c['val_acc']:.6f}")
    table.add_row("val_loss", f"{a['val_loss']:.8f}", f"{c['val_loss']:.8f}")
    console.print(table)
    console.print(f"checkpoints kept in B: {[i.path.name + ' (' + ','.join(i.kept_for) + ')' for i in list_run(run_b)]}")
    if same:
        console.print(f"[bold green]identical[/]: resuming after a SIGKILL near step {killed['step']} changed nothing "
                      f"({time.perf_counter() - t0:.1f}s)")
        return 0
    console.print("[bold red]MISMATCH[/]: the resumed run differs from the uninterrupted one")
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m savegame.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("run")
    args = parser.parse_args()
    if args.cmd == "worker":
        worker(args.run)
