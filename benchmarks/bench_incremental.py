"""Incremental checkpoints (issue 14 part 2): a save costs what changed.

Run: ``python benchmarks/bench_incremental.py --gb 1 --repeats 5`` (``--gb`` scales the frozen
base and the trainable part together, for quick runs).

A frozen base of ``--gb`` GB (Linear layers, no grad) plus a trainable part of 20 MB x gb of
parameters with Adam (so 3 x that changes per step: weights and two moments). Three bars, each
measured in the same run, methods interleaved so disk noise hits all alike:

1. **Save time vs the floor**: an incremental ``Checkpointer.save`` after one training step,
   against writing only the changed bytes durably (one file: ``write`` + ``fsync``, the same
   bytes). Bar: <= 1.5x.
2. **Disk of ten checkpoints** (``Keep(last=10)``): bytes on disk against base + 10 x changed.
   Bar: <= 1.1x.
3. **A save where everything changed** (every tensor updated in place before each save):
   ``incremental=True`` against ``incremental=False`` (what every save cost before), blocking
   saves and ``save_async`` (its stall and the time until committed). Bar: <= 1.05x.

Prints a table and appends a JSON line to ``bench-out/incremental.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import savegame as sg

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 2048


def build(gb: float) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    per = WIDTH * WIDTH * 4
    layers = max(1, round(gb * (1 << 30) / per))
    base = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    for p in base.parameters():
        p.requires_grad_(False)
    trainable = int(20 * (1 << 20) * gb) // 4  # 20 MB x gb of float32 parameters
    rows = max(1, trainable // WIDTH)
    head = torch.nn.Sequential(torch.nn.Linear(WIDTH, rows, bias=False))
    opt = torch.optim.Adam(head.parameters(), lr=1e-4)
    train(base, head, opt)
    return base, head, opt


def train(base: torch.nn.Module, head: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in head.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def changed_tensors(head: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach() for p in head.parameters()]
    for s in opt.state.values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def raw_write(path: Path, tensors: list[torch.Tensor]) -> None:
    """The floor: the changed bytes written once and fsynced (no header, no hash, no commit)."""
    with open(path, "wb", buffering=0) as f:
        for t in tensors:
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        os.fsync(f.fileno())
    path.unlink()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sg-bench-inc-", dir=args.dir))
    base, head, opt = build(args.gb)
    state = sg.TrainState(base=base, head=head, optimizer=opt, rng=False)
    base_bytes = nbytes([p.detach() for p in base.parameters()])
    changed = nbytes(changed_tensors(head, opt))
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)

    try:
        # 1 + 2: incremental saves of the frozen base + trainable part, ten of them kept
        run = work / "frozen"
        with sg.Checkpointer(
            run, save=sg.Every(steps=1), keep=sg.Keep(last=10), handle_signals=False
        ) as ck:
            ck.save(state, 0)  # the base, written once
            for step in range(1, 10):
                train(base, head, opt)
                if step <= args.repeats:
                    timed("raw write+fsync of the changed bytes", lambda: raw_write(work / "raw", changed_tensors(head, opt)))
                    timed("incremental save (1 step changed)", lambda s=step: ck.save(state, s))
                else:
                    ck.save(state, step)
        disk = du(run)
        # 3: everything changes before every save: incremental on vs off, interleaved
        for p in base.parameters():
            p.requires_grad_(False)

        def bump() -> None:
            with torch.no_grad():
                for p in [*base.parameters(), *head.parameters()]:
                    p.add_(1e-3)
                train(base, head, opt)

        cks = {
            on: sg.Checkpointer(
                work / f"full-{on}", save=sg.Every(steps=1), keep=sg.Keep(last=2),
                handle_signals=False, incremental=on, async_save=True,
            )  # fmt: skip
            for on in (True, False)
        }
        try:
            for ck in cks.values():
                ck.save(state, 0)
            for step in range(1, args.repeats + 1):
                for on in ((True, False) if step % 2 else (False, True)):
                    bump()
                    timed(f"full-change save, incremental={on}", lambda c=cks[on], s=step: c.save(state, s))
            for step in range(args.repeats + 1, 2 * args.repeats + 1):
                for on in ((True, False) if step % 2 else (False, True)):
                    bump()
                    ck = cks[on]
                    t0 = time.perf_counter()
                    handle = ck.save_async(state, step)
                    stall = time.perf_counter() - t0
                    assert handle is not None
                    handle.result()
                    times.setdefault(f"full-change async stall, incremental={on}", []).append(stall)
                    times.setdefault(f"full-change async total, incremental={on}", []).append(
                        time.perf_counter() - t0
                    )
        finally:
            for ck in cks.values():
                ck.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: median(v) for k, v in times.items()}
    ratios = {
        "save / raw write of changed bytes (bar <= 1.5)": med["incremental save (1 step changed)"]
        / med["raw write+fsync of the changed bytes"],
        "disk of 10 / (base + 10 x changed) (bar <= 1.1)": disk / (base_bytes + 10 * changed),
        "full-change sync: incremental / full (bar <= 1.05)": med["full-change save, incremental=True"]
        / med["full-change save, incremental=False"],
        "full-change async total: incremental / full (bar <= 1.05)": med["full-change async total, incremental=True"]
        / med["full-change async total, incremental=False"],
        "full-change async stall: incremental / full": med["full-change async stall, incremental=True"]
        / med["full-change async stall, incremental=False"],
    }
    print(f"base {base_bytes / 1e9:.3f} GB, changed per step {changed / 1e6:.1f} MB, load {os.getloadavg()[0]:.2f}")
    for k, v in med.items():
        print(f"  {k:<48} {v:8.4f} s  (n={len(times[k])})")
    print(f"  {'disk of 10 checkpoints':<48} {disk / 1e9:8.4f} GB")
    for k, v in ratios.items():
        print(f"  {k:<60} {v:6.3f}")
    out = ROOT / "bench-out"
    out.mkdir(exist_ok=True)
    with open(out / "incremental.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": platform.node(),
                    "gb": args.gb,
                    "repeats": args.repeats,
                    "load": os.getloadavg()[0],
                    "medians_s": med,
                    "disk_bytes": disk,
                    "base_bytes": base_bytes,
                    "changed_bytes": changed,
                    "ratios": ratios,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
