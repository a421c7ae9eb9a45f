"""Framework integrations (issue 12): savegame vs each framework's own checkpointing.

Run: ``python benchmarks/bench_integrations.py [--frameworks lightning keras] [--steps 300]``

Per framework, in one process, the same model and schedule (a save every ``--every`` steps):

  * ``throughput``: training steps/s with no checkpointing, with the framework's own
    checkpointing (Lightning ``ModelCheckpoint`` -> ``torch.save``, also with its
    ``AsyncCheckpointIO``; Keras ``ModelCheckpoint`` -> ``.keras``), and with savegame's callback,
    sync and async. ``per save`` is the stall a save adds: (time with - time without) / saves.
  * ``resume``: the time from ``fit()`` to the first training batch when resuming one run at
    step 10 and at step 10,000 (mid-epoch both): equal within noise, because the data position
    is restored, not reached by iterating over the batches before it.

JSON lines go to ``bench-out/integrations.jsonl``; the table is printed.

The registry: each framework is one function ``bench(args) -> list[dict]`` registered with
``@framework("name")``; ``--frameworks`` picks them (default: all whose package imports). The
Hugging Face functions are added the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

Bench = Callable[[argparse.Namespace], list[dict[str, Any]]]
REGISTRY: dict[str, Bench] = {}


def framework(name: str) -> Callable[[Bench], Bench]:
    """Register ``fn`` as the benchmark of framework ``name``."""

    def add(fn: Bench) -> Bench:
        REGISTRY[name] = fn
        return fn

    return add


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each run: one untimed warm-up of the first (imports, first-call
    compilation, allocator: the first fit of a process is the slowest, and would make whatever
    runs first look slow), then ``repeats`` rounds, every run once per round, the order rotated
    from round to round so drift on the machine hits every configuration alike."""
    names = list(runs)
    runs[names[0]]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def _keep_only(root: Path, step: int) -> Path:
    """A copy of run ``root`` whose newest checkpoint is ``step`` (resume picks the newest). The
    older ones stay: a checkpoint refers to the tensor files of an earlier one of its run for the
    tensors that did not change, so dropping those would make it incomplete."""
    out = Path(tempfile.mkdtemp(prefix="sg-bench-resume-"))
    shutil.rmtree(out)
    shutil.copytree(
        root,
        out,
        ignore=lambda d, names: (
            [n for n in names if n.startswith("step-") and int(n.removeprefix("step-")) > step]
            if Path(d) == root
            else []
        ),
    )
    return out


# ---- Lightning ---------------------------------------------------------------------------------
@framework("lightning")
def bench_lightning(args: argparse.Namespace) -> list[dict[str, Any]]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    import savegame as sg
    from savegame.integrations.lightning import SavegameCallback

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    class Net(pl.LightningModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                torch.nn.ReLU(), torch.nn.Linear(width, 1),
            )  # fmt: skip

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def loader(n: int) -> StatefulDataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 64, generator=g)
        return StatefulDataLoader(TensorDataset(x, x.sum(1)), batch_size=32, shuffle=True)

    def trainer(
        callbacks: list[Any], steps: int, plugins: list[Any] | None = None, tmp: str = "."
    ) -> pl.Trainer:
        return pl.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
            callbacks=callbacks, plugins=plugins, default_root_dir=tmp,
        )  # fmt: skip

    rows: list[dict[str, Any]] = []
    steps, every = args.steps, args.every
    saves = steps // every
    configs: dict[str, Callable[[str], tuple[list[Any], list[Any] | None]]] = {
        "none": lambda d: ([], None),
        "lightning ModelCheckpoint": lambda d: (
            [pl.callbacks.ModelCheckpoint(dirpath=d, every_n_train_steps=every, save_top_k=-1)], None),
        "lightning ModelCheckpoint + AsyncCheckpointIO": lambda d: (
            [pl.callbacks.ModelCheckpoint(dirpath=d, every_n_train_steps=every, save_top_k=-1)], [AsyncCheckpointIO()]),
        "savegame sync": lambda d: ([SavegameCallback(d, save=sg.Every(steps=every), keep=sg.Keep(last=saves + 1), async_save=False, handle_signals=False)], None),
        "savegame async": lambda d: ([SavegameCallback(d, save=sg.Every(steps=every), keep=sg.Keep(last=saves + 1), async_save=True, handle_signals=False)], None),
    }  # fmt: skip
    runs: dict[str, Callable[[], None]] = {}
    for name, make in configs.items():

        def run(make: Callable[[str], tuple[list[Any], list[Any] | None]] = make) -> None:
            with tempfile.TemporaryDirectory() as d:
                torch.manual_seed(0)
                callbacks, plugins = make(d)
                trainer(callbacks, steps, plugins, d).fit(
                    Net(args.width), train_dataloaders=loader(steps * 32)
                )

        runs[name] = run
    times = _interleaved(runs, args.repeats)
    params = sum(p.numel() for p in Net(args.width).parameters())
    for name, t in times.items():
        extra = (t - times["none"]) / saves if name != "none" else 0.0
        rows.append({"framework": "lightning", "kind": "throughput", "config": name, "steps_per_s": steps / t,
                     "per_save_s": extra, "saves": 0 if name == "none" else saves, "params": params})  # fmt: skip

    # resume at step 10 and 10,000 of one run (a small model: the data position is what matters)
    class Stamp(pl.Callback):
        def __init__(self) -> None:
            self.first: float | None = None

        def on_train_batch_start(self, *a: Any) -> None:
            if self.first is None:
                self.first = time.perf_counter()

    far = args.resume_steps
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "run"
        torch.manual_seed(0)
        # one run: saved at step 10, then continued (resumed) to step `far` and saved there
        for until in (10, far):
            cb = SavegameCallback(
                root, save=sg.Every(steps=until), keep=sg.Keep(last=2), handle_signals=False
            )
            trainer([cb], until, tmp=d).fit(Net(32), train_dataloaders=loader(32 * 37))
        for at in (10, far):
            durations = []
            for _ in range(args.repeats):
                copy = _keep_only(root, at)
                stamp = Stamp()
                cb = SavegameCallback(copy, save=sg.Every(steps=10**9), handle_signals=False)
                t0 = time.perf_counter()
                trainer([cb, stamp], at + 1, tmp=d).fit(Net(32), train_dataloaders=loader(32 * 37))
                assert cb.restored_step == at and stamp.first is not None
                durations.append(stamp.first - t0)
                shutil.rmtree(copy)
            rows.append({"framework": "lightning", "kind": "resume", "config": f"resume at step {at}",
                         "seconds": statistics.median(durations)})  # fmt: skip
    return rows


# ---- Keras 3 -----------------------------------------------------------------------------------
@framework("keras")
def bench_keras(args: argparse.Namespace) -> list[dict[str, Any]]:
    import keras
    import torch
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    import savegame as sg
    from savegame.integrations.keras import SavegameCheckpoint

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    def build(width: int) -> keras.Model:
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"), keras.layers.Dense(1)])  # fmt: skip
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        return m

    def loader(n: int) -> StatefulDataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 64, generator=g)
        return StatefulDataLoader(
            TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32, shuffle=True
        )

    rows: list[dict[str, Any]] = []
    steps, every = args.steps, args.every
    saves = steps // every

    def own(d: str, dl: Any) -> list[Any]:
        return [
            keras.callbacks.ModelCheckpoint(
                os.path.join(d, "ckpt-{epoch}-{batch}.keras"), save_freq=every
            )
        ]

    configs: dict[str, Callable[[str, Any], list[Any]]] = {
        "none": lambda d, dl: [],
        "keras ModelCheckpoint (.keras)": own,
        "keras BackupAndRestore": lambda d, dl: [keras.callbacks.BackupAndRestore(d, save_freq=every, delete_checkpoint=False)],
        "savegame sync": lambda d, dl: [SavegameCheckpoint(d, loader=dl, save=sg.Every(steps=every), keep=sg.Keep(last=saves + 1), async_save=False, handle_signals=False, verbose=0)],
        "savegame async": lambda d, dl: [SavegameCheckpoint(d, loader=dl, save=sg.Every(steps=every), keep=sg.Keep(last=saves + 1), async_save=True, handle_signals=False, verbose=0)],
    }  # fmt: skip
    runs: dict[str, Callable[[], None]] = {}
    for name, make in configs.items():

        def run(make: Callable[[str, Any], list[Any]] = make) -> None:
            with tempfile.TemporaryDirectory() as d:
                dl = loader(steps * 32)
                model = build(args.width)
                model.fit(dl, epochs=1, callbacks=make(d, dl), verbose=0, shuffle=False)

        runs[name] = run
    times = _interleaved(runs, args.repeats)
    params = build(args.width).count_params()
    for name, t in times.items():
        extra = (t - times["none"]) / saves if name != "none" else 0.0
        rows.append({"framework": "keras", "kind": "throughput", "config": name, "steps_per_s": steps / t,
                     "per_save_s": extra, "saves": 0 if name == "none" else saves, "params": params})  # fmt: skip

    class Stamp(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.first: float | None = None

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if self.first is None:
                self.first = time.perf_counter()

    far = args.resume_steps
    per_epoch = 37

    class StopAt(keras.callbacks.Callback):
        """Sends SIGTERM after step ``at``: savegame saves there (mid-epoch) and exits 75."""

        def __init__(self, at: int) -> None:
            super().__init__()
            self.at = at

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if int(self.model.optimizer.iterations.value.item()) == self.at - 1:
                os.kill(os.getpid(), signal.SIGTERM)  # noted; saved at the next batch's end

    import signal
    import warnings

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "run"
        for until in (10, far):  # one run: stopped (SIGTERM) at 10, resumed, stopped at `far`
            dl = loader(32 * per_epoch)
            model = build(32)
            cb = SavegameCheckpoint(
                root, loader=dl, save=sg.Every(steps=10**9), keep=sg.Keep(last=2), verbose=0
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(dl, epochs=far // per_epoch + 2, callbacks=[cb, StopAt(until)],
                              verbose=0, shuffle=False)  # fmt: skip
            except SystemExit:
                pass
        for at in (10, far):
            durations = []
            for _ in range(args.repeats):
                copy = _keep_only(root, at)
                dl = loader(32 * per_epoch)
                model = build(32)
                stamp = Stamp()
                cb = SavegameCheckpoint(
                    copy, loader=dl, save=sg.Every(steps=10**9), handle_signals=False, verbose=0
                )
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(dl, epochs=at // per_epoch + 1, callbacks=[cb, stamp], verbose=0,
                              shuffle=False)  # fmt: skip
                assert cb.restored_step == at and stamp.first is not None
                durations.append(stamp.first - t0)
                shutil.rmtree(copy)
            rows.append({"framework": "keras", "kind": "resume", "config": f"resume at step {at}",
                         "seconds": statistics.median(durations)})  # fmt: skip
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'framework':<10} {'configuration':<46} {'steps/s':>9} {'per save':>10} {'resume':>9}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['framework']:<10} {r['config']:<46} unavailable: {r['error']}")
        elif r["kind"] == "throughput":
            per = f"{r['per_save_s'] * 1000:.1f} ms" if r["saves"] else "-"
            lines.append(
                f"{r['framework']:<10} {r['config']:<46} {r['steps_per_s']:>9.1f} {per:>10} {'':>9}"
            )
        else:
            lines.append(
                f"{r['framework']:<10} {r['config']:<46} {'':>9} {'':>10} {r['seconds']:>8.3f}s"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frameworks", nargs="*", default=None, help=f"of {sorted(REGISTRY)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument(
        "--width", type=int, default=1024, help="hidden width (2 layers; 1024: 1.1M parameters)"
    )
    parser.add_argument("--resume-steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-out/integrations.jsonl")
    args = parser.parse_args()
    names = args.frameworks or list(REGISTRY)
    rows: list[dict[str, Any]] = []
    for name in names:
        if name not in REGISTRY:
            parser.error(f"unknown framework {name!r}; known: {sorted(REGISTRY)}")
        try:
            rows += REGISTRY[name](args)
        except ImportError as exc:
            rows.append(
                {"framework": name, "kind": "throughput", "config": "all", "error": str(exc)}
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "time": time.time(), "cpus": os.cpu_count()}) + "\n")
    print("\n" + _table(rows))


if __name__ == "__main__":
    main()
