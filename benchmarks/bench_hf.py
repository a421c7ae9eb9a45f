"""Hugging Face Trainer and Accelerate: their own checkpointing vs savegame's (issue 12).

Run: ``python benchmarks/bench_hf.py [--quick] [--out bench-out/hf.json]``

Per framework, in one process, the same model, data and schedule (a save every ``EVERY``
steps):

* **throughput** (steps/s over the whole run) and **time per save** (how long the training loop
  waits for one save: the Trainer's ``_save_checkpoint`` / ``accelerator.save_state``, savegame's
  ``Checkpointer.step`` when it saved) for: no checkpointing, the framework's own checkpoints,
  savegame sync, savegame async;
* **resume time** (``trainer.train()`` called → the first training step begins; for
  Accelerate ``load_state`` → the first batch in hand) from a checkpoint at step 10 and at step
  10,000 of the same run, with savegame and with the framework's own resume. The Trainer's own
  resume skips the trained batches of the epoch (``skip_first_batches``); savegame restores the
  sampler's position directly.

The functions :func:`bench_transformers` and :func:`bench_accelerate` take the registry's
``argparse.Namespace`` (only ``.quick`` is read) and return rows (dicts), for
``benchmarks/bench_integrations.py``'s per-framework registry: :data:`BENCHMARKS` maps the
framework names to them.
Numbers depend on the machine and its load; the CPU run in docs/integrations-hf.md was taken on
a shared 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

warnings.simplefilter("ignore")
EVERY = 10


# ---- measurement helpers -------------------------------------------------------------------------
class _Stalls:
    """Times savegame's Checkpointer.step calls that saved (patched for the benchmark only)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __enter__(self) -> _Stalls:
        from savegame.checkpointer import facade

        self._orig = orig = facade.Checkpointer.step
        times = self.times

        def step(ckpt: Any, *a: Any, **k: Any) -> bool:
            t = time.perf_counter()
            saved = orig(ckpt, *a, **k)
            if saved:
                times.append(time.perf_counter() - t)
            return saved

        facade.Checkpointer.step = step  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from savegame.checkpointer import facade

        facade.Checkpointer.step = self._orig  # type: ignore[method-assign]


def _row(
    framework: str, method: str, steps: int, wall: float, saves: list[float]
) -> dict[str, Any]:
    return {
        "framework": framework,
        "what": "train",
        "method": method,
        "steps": steps,
        "steps_per_s": round(steps / wall, 2),
        "saves": len(saves),
        "save_s_median": round(statistics.median(saves), 4) if saves else None,
        "save_s_total": round(sum(saves), 3),
    }


# ---- transformers ----------------------------------------------------------------------------------
def _tokens(n: int, seq: int, vocab: int) -> Any:
    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    return Tokens()


def _trainer(
    out: Path, *, steps: int, big: bool, save_steps: int | None, batch: int = 4, n: int = 4096
) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    if big:  # 5.3M parameters: a 63 MB state with AdamW's moments
        cfg = GPT2Config(vocab_size=8192, n_positions=64, n_embd=256, n_layer=4, n_head=4)
        ds, seq = _tokens(n, 32, 8192), 32
    else:  # tiny: the Trainer's own per-step cost dominates
        cfg = GPT2Config(vocab_size=64, n_positions=8, n_embd=8, n_layer=1, n_head=1)
        ds, seq = _tokens(n, 8, 64), 8
    del seq
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=ds)


def _time_hf_saves(trainer: Any) -> list[float]:
    times: list[float] = []
    orig = trainer._save_checkpoint

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        out = orig(*a, **k)
        times.append(time.perf_counter() - t)
        return out

    trainer._save_checkpoint = timed
    return times


def _first_step_timer(trainer: Any) -> dict[str, float]:
    from transformers import TrainerCallback

    mark: dict[str, float] = {}

    class First(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            mark.setdefault("first_step", time.perf_counter())
            control.should_training_stop = True  # one step is enough

    trainer.add_callback(First())
    return mark


def bench_transformers(
    args: Any = None, *, quick: bool = False, root: Path | None = None
) -> list[dict[str, Any]]:
    quick = quick or bool(getattr(args, "quick", False))
    import savegame as sg
    from savegame.integrations.transformers import attach

    root = Path(root or tempfile.mkdtemp(prefix="bench-hf-"))
    rows: list[dict[str, Any]] = []
    steps = 30 if quick else 60
    # 1. throughput and time per save, the same schedule (every EVERY steps)
    for method in ("none", "trainer", "savegame-sync", "savegame-async"):
        out = root / f"tp-{method}"
        shutil.rmtree(out, ignore_errors=True)
        trainer = _trainer(
            out / "hf", steps=steps, big=True, save_steps=EVERY if method == "trainer" else None
        )
        saves = _time_hf_saves(trainer) if method == "trainer" else []
        if method.startswith("savegame"):
            attach(
                trainer,
                out / "sg",
                save=sg.Every(steps=EVERY),
                keep=sg.Keep(last=2),
                async_save=method.endswith("async"),
                save_on_train_end=False,
            )
        with _Stalls() as stalls:
            t = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t
        rows.append(_row("transformers", method, steps, wall, saves or stalls.times))
        print(json.dumps(rows[-1]), flush=True)
    # 2. resume time at step 10 and at step 10,000 of one run (tiny model, batch 1, mid-epoch)
    far = 2_000 if quick else 10_000
    run = root / "resume"
    shutil.rmtree(run, ignore_errors=True)
    for target in (10, far):
        trainer = _trainer(
            run / "hf", steps=target, big=False, save_steps=target, batch=1, n=3 * far
        )
        attach(trainer, run / f"sg-{target}", save=sg.Every(steps=target), keep=sg.Keep(last=1))
        t = time.perf_counter()
        trainer.train()
        print(f"trained to step {target} in {time.perf_counter() - t:.1f}s", flush=True)
    for target in (10, far):
        for method in ("savegame", "trainer"):
            samples = []
            for _ in range(2 if quick else 3):
                trainer = _trainer(
                    run / "hf", steps=target + 5, big=False, save_steps=None, batch=1, n=3 * far
                )
                if method == "savegame":
                    sg_run = run / f"sg-{target}-copy"
                    shutil.rmtree(sg_run, ignore_errors=True)
                    shutil.copytree(run / f"sg-{target}", sg_run)
                    cb = attach(
                        trainer, sg_run, save=sg.Every(steps=10**9), save_on_train_end=False
                    )
                    mark = _first_step_timer(trainer)
                    t = time.perf_counter()
                    trainer.train()
                    assert cb.resumed_step == target, cb.resumed_step
                else:
                    mark = _first_step_timer(trainer)
                    t = time.perf_counter()
                    trainer.train(resume_from_checkpoint=str(run / "hf" / f"checkpoint-{target}"))
                samples.append(mark["first_step"] - t)
            rows.append(
                {
                    "framework": "transformers",
                    "what": "resume",
                    "method": method,
                    "step": target,
                    "resume_s_median": round(statistics.median(samples), 4),
                    "resume_s": [round(s, 4) for s in samples],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- accelerate ------------------------------------------------------------------------------------
def _acc_setup(n: int, batch: int, big: bool) -> tuple[Any, ...]:
    from accelerate import Accelerator, DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    from savegame.integrations.accelerate import DirectRandomSampler

    torch.manual_seed(0)
    width = 512 if big else 8
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        *[torch.nn.Linear(width, width) for _ in range(6 if big else 0)],
        torch.nn.Linear(width, 4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 100)
    ds = torch.utils.data.TensorDataset(torch.randn(n, width), torch.randint(0, 4, (n,)))
    loader = StatefulDataLoader(
        ds,
        batch_size=batch,
        sampler=DirectRandomSampler(ds, seed=0),
        generator=torch.Generator().manual_seed(1),
    )
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)
    )
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    return acc, model, opt, loader, sched


def _acc_loop(
    acc: Any,
    model: Any,
    opt: Any,
    loader: Any,
    sched: Any,
    steps: int,
    on_step: Callable[[int], None],
) -> None:
    step = 0
    while step < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            on_step(step)
            if step == steps:
                return


def bench_accelerate(
    args: Any = None, *, quick: bool = False, root: Path | None = None
) -> list[dict[str, Any]]:
    quick = quick or bool(getattr(args, "quick", False))
    import savegame as sg
    from savegame.integrations.accelerate import attach

    root = Path(root or tempfile.mkdtemp(prefix="bench-acc-"))
    rows: list[dict[str, Any]] = []
    steps = 30 if quick else 60
    for method in ("none", "accelerate", "savegame-sync", "savegame-async"):
        out = root / f"tp-{method}"
        shutil.rmtree(out, ignore_errors=True)
        acc, model, opt, loader, sched = _acc_setup(4096, 32, big=True)
        saves: list[float] = []
        ckpt = None
        if method == "accelerate":

            def on_step(step: int) -> None:
                if step % EVERY == 0:
                    t = time.perf_counter()
                    acc.save_state(str(out / f"checkpoint-{step}"))  # noqa: B023 (called in this iteration)
                    saves.append(time.perf_counter() - t)  # noqa: B023
        elif method.startswith("savegame"):
            ckpt = attach(
                acc,
                out,
                save=sg.Every(steps=EVERY),
                keep=sg.Keep(last=2),
                async_save=method.endswith("async"),
            )
            on_step = ckpt.step  # type: ignore[assignment]
        else:

            def on_step(step: int) -> None:
                return None

        with _Stalls() as stalls:
            t = time.perf_counter()
            _acc_loop(acc, model, opt, loader, sched, steps, on_step)
            if ckpt is not None:
                ckpt.close()
            wall = time.perf_counter() - t
        rows.append(_row("accelerate", method, steps, wall, saves or stalls.times))
        print(json.dumps(rows[-1]), flush=True)
    # resume at step 10 and 10,000 (one epoch of 30,000 batches of 1: mid-epoch)
    far = 2_000 if quick else 10_000
    for target in (10, far):
        acc, model, opt, loader, sched = _acc_setup(3 * far, 1, big=False)
        ckpt = attach(acc, root / f"resume-{target}", save=sg.Every(steps=target))
        plain = root / f"resume-{target}-accelerate"

        def at(step: int, target: int = target) -> None:
            ckpt.step(step)  # noqa: B023 (called in this iteration)
            if step == target:
                type(acc).save_state(acc, str(plain))  # noqa: B023 (Accelerate's own, for comparison)

        _acc_loop(acc, model, opt, loader, sched, target, at)
        ckpt.close()
    for target in (10, far):
        for method in ("savegame", "accelerate"):
            samples = []
            for _ in range(2 if quick else 3):
                acc, model, opt, loader, sched = _acc_setup(3 * far, 1, big=False)
                t = time.perf_counter()
                if method == "savegame":
                    ckpt = attach(acc, root / f"resume-{target}", save=sg.Every(steps=10**9))
                    assert acc.load_state() == target
                    next(iter(loader))
                    ckpt.close()
                else:
                    acc.load_state(str(root / f"resume-{target}-accelerate"))
                    next(iter(loader))
                samples.append(time.perf_counter() - t)
            rows.append(
                {
                    "framework": "accelerate",
                    "what": "resume",
                    "method": method,
                    "step": target,
                    "resume_s_median": round(statistics.median(samples), 4),
                    "resume_s": [round(s, 4) for s in samples],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


#: For benchmarks/bench_integrations.py's per-framework registry.
BENCHMARKS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "transformers": bench_transformers,
    "accelerate": bench_accelerate,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer steps; step 2,000 instead of 10,000")
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    p.add_argument("--out", default="bench-out/hf.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # a shared machine: more threads only contend (and 1 is deterministic)
    rows: list[dict[str, Any]] = []
    for name in a.only or sorted(BENCHMARKS):
        rows += BENCHMARKS[name](a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
