"""Outside review (s14b), as a new user with docs/integrations.md only: the Lightning callback
after a SIGKILL at a (seeded) random step, in the setups a user combines — ``Every(epochs=N)``,
``Every(steps=N)`` with ``val_check_interval``, gradient accumulation, ``max_epochs`` then a
larger one, ``max_steps`` mid-epoch then a larger one, ``EarlyStopping``, ``Keep(best=K,
monitor=...)`` — each compared bitwise (weights, Adam moments, LR, samples seen) with an
uninterrupted run, and a finished run requeued (trains nothing).

This file is also the training script its tests start (``python this_file.py JSON``), so the
SIGKILL is a real one; the remote tests (tests/remote/test_outside_s14b_remote.py) reuse it.
A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import lightning as sgl  # noqa: E402

HERE = Path(__file__).resolve()
SAMPLES, BATCH = 40, 8  # 5 batches per epoch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Net(pl.LightningModule):
    def __init__(self, trace: list[list[int]]) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        self.trace = trace
        self.validations = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.trace.append([int(self.global_step)] + [int(i) for i in idx])
        x = x + 0.05 * torch.randn_like(x)
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def on_validation_end(self) -> None:
        self.validations += 1

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Kill(pl.Callback):
    """SIGKILL (no handler runs) at the end of optimizer step ``at``."""

    def __init__(self, at: int, cb: sgl.SavegameCallback, wait: bool) -> None:
        self.at, self.cb, self.wait = at, cb, wait

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            if self.wait and self.cb.checkpointer is not None:
                self.cb.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def data(n: int = SAMPLES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1) + 0.1 * torch.randn(n, generator=g), torch.arange(n))


def fingerprint(model: pl.LightningModule, trainer: pl.Trainer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    opt = trainer.optimizers[0]
    for group in opt.state_dict()["state"].values():
        for k, v in sorted(group.items()):
            h.update(k.encode())
            h.update(
                v.detach().contiguous().numpy().tobytes()
                if torch.is_tensor(v)
                else repr(v).encode()
            )
    h.update(repr(opt.param_groups[0]["lr"]).encode())
    return h.hexdigest()


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """One fit as a user's script runs it (fresh or resumed by the callback)."""
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    trace: list[list[int]] = []
    model = Net(trace)
    loader = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    val = DataLoader(data(16, seed=2), batch_size=16)
    save = cfg.get("save", {"steps": 3})
    keep = sg.Keep(**cfg["keep"]) if "keep" in cfg else sg.Keep(last=20)
    cb = sgl.SavegameCallback(
        cfg["root"], save=sg.Every(**save), keep=keep, async_save=cfg.get("async_save", True)
    )
    callbacks: list[pl.Callback] = [cb]
    if cfg.get("early_stop"):
        callbacks.append(
            pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", **cfg["early_stop"])
        )
    if cfg.get("kill_at") is not None:
        callbacks.append(Kill(cfg["kill_at"], cb, cfg.get("wait_before_kill", False)))
    trainer = pl.Trainer(
        max_steps=cfg.get("max_steps", -1),
        max_epochs=cfg.get("max_epochs", -1 if cfg.get("max_steps") else 3),
        val_check_interval=cfg.get("val_check_interval"),
        check_val_every_n_epoch=cfg.get("check_val_every_n_epoch", 1),
        accumulate_grad_batches=cfg.get("accumulate", 1),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val)
    with sg.Checkpointer(cfg["root"], handle_signals=False) as ck:
        steps = sorted(c.step for c in ck.list() if c.valid)
    return {
        "fingerprint": fingerprint(model, trainer),
        "trace": trace,
        "restored": cb.restored_step,
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        "validations": model.validations,
        "steps": steps,
    }


def run_script(
    cfg: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, dict[str, Any] | None, str]:
    """This file as a script in a new process: (exit status, its result or None, stderr)."""
    proc = subprocess.run(
        [sys.executable, str(HERE), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
    )
    out = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
    return proc.returncode, out, proc.stderr[-3000:]


def tail_from(trace: list[list[int]], step: int) -> list[list[int]]:
    """The entries of an uninterrupted run's trace trained after optimizer step ``step``."""
    return [t for t in trace if t[0] >= step]


def crash_and_resume(
    cfg: dict[str, Any], kill_at: int, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The uninterrupted run (in this process) and a run SIGKILLed at ``kill_at`` then run again
    (in this process, as the requeued job)."""
    ref = train({**cfg, "root": str(tmp / "ref")})
    rc, _, err = run_script({**cfg, "root": str(tmp / "run"), "kill_at": kill_at})
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "root": str(tmp / "run")})
    return ref, resumed


def assert_bitwise(ref: dict[str, Any], resumed: dict[str, Any]) -> None:
    # a SIGKILL loses an async save still in flight (docs): then the previous one (or none)
    restored = resumed["restored"] or 0
    assert resumed["global_step"] == ref["global_step"]
    assert resumed["trace"] == tail_from(ref["trace"], restored)
    assert resumed["fingerprint"] == ref["fingerprint"]


def kill_step(seed: int, lo: int, hi: int) -> int:
    return random.Random(seed).randint(lo, hi)


# --- the setups -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])  # CI < 20 min
def test_every_epochs_2_killed_at_a_random_step_resumes_bitwise(tmp_path: Path, seed: int) -> None:
    cfg = {"save": {"epochs": 2}, "max_epochs": 5}
    at = kill_step(seed, 11, 24)  # after the epoch-2 save (step 10), before the end (25)
    ref, resumed = crash_and_resume(cfg, at, tmp_path)
    assert resumed["restored"] in (None, 10, 20)
    assert_bitwise(ref, resumed)


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_every_steps_with_val_check_interval_resumes_bitwise(tmp_path: Path) -> None:
    """Validation every 2 batches, saves every 2 steps (each waits for its validation)."""
    cfg = {"save": {"steps": 2}, "max_epochs": 3, "val_check_interval": 2,
           "keep": {"last": 20}}  # fmt: skip
    ref, resumed = crash_and_resume(cfg, kill_step(3, 5, 13), tmp_path)
    assert_bitwise(ref, resumed)
    assert resumed["validations"] + 0 <= ref["validations"]


@pytest.mark.parametrize("seed", [4, pytest.param(5, marks=pytest.mark.slow)])  # CI < 20 min
def test_gradient_accumulation_resumes_bitwise(tmp_path: Path, seed: int) -> None:
    """accumulate_grad_batches=2 over 5 batches per epoch: optimizer steps straddle nothing
    (Lightning steps at the epoch's last batch), 3 steps per epoch."""
    cfg = {"save": {"steps": 2}, "max_epochs": 3, "accumulate": 2}
    ref, resumed = crash_and_resume(cfg, kill_step(seed, 3, 8), tmp_path)
    assert ref["global_step"] == 9
    assert_bitwise(ref, resumed)


def test_max_epochs_then_a_larger_max_epochs_after_a_crash(tmp_path: Path) -> None:
    """Finished at max_epochs=2, requeued (nothing trained), then max_epochs=4 killed at a random
    step and run again: equal to an uninterrupted max_epochs=4 run."""
    cfg = {"save": {"steps": 3}}
    ref = train({**cfg, "max_epochs": 4, "root": str(tmp_path / "ref")})
    run = str(tmp_path / "run")
    first = train({**cfg, "max_epochs": 2, "root": run})
    assert first["global_step"] == 10 and 10 in first["steps"]
    again = train({**cfg, "max_epochs": 2, "root": run})
    assert again["trace"] == [] and again["restored"] == 10 and again["validations"] == 0
    rc, _, err = run_script({**cfg, "max_epochs": 4, "root": run, "kill_at": kill_step(6, 13, 19)})
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "max_epochs": 4, "root": run})
    assert_bitwise(ref, resumed)


@pytest.mark.slow  # CI under 20 minutes
def test_max_steps_mid_epoch_then_a_larger_max_steps_after_a_crash(tmp_path: Path) -> None:
    cfg = {"save": {"steps": 4}}
    ref = train({**cfg, "max_steps": 17, "root": str(tmp_path / "ref")})
    run = str(tmp_path / "run")
    first = train({**cfg, "max_steps": 7, "root": run})  # stops at batch 2 of epoch 2
    assert first["global_step"] == 7 and 7 in first["steps"]
    again = train({**cfg, "max_steps": 7, "root": run})
    assert again["trace"] == [] and again["restored"] == 7
    rc, _, err = run_script({**cfg, "max_steps": 17, "root": run, "kill_at": kill_step(7, 9, 16)})
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "max_steps": 17, "root": run})
    assert_bitwise(ref, resumed)


ES = {"patience": 1, "min_delta": 0.05}  # stops at step 40 of 150 (epoch 8 of 30)


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_early_stopping_killed_at_a_random_step_resumes_bitwise(tmp_path: Path) -> None:
    cfg = {"save": {"steps": 2}, "max_epochs": 30, "early_stop": ES}
    ref = train({**cfg, "root": str(tmp_path / "ref")})
    assert ref["epoch"] < 29, "EarlyStopping never stopped: the test needs another setting"
    stop = ref["global_step"]
    rc, _, err = run_script(
        {**cfg, "root": str(tmp_path / "run"), "kill_at": kill_step(8, 3, stop - 1)}
    )
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "root": str(tmp_path / "run")})
    assert_bitwise(ref, resumed)
    assert resumed["epoch"] == ref["epoch"]


def test_early_stopping_requeued_after_it_stopped_trains_nothing(tmp_path: Path) -> None:
    cfg = {"save": {"steps": 2}, "max_epochs": 30, "early_stop": ES, "root": str(tmp_path / "run")}
    first = train(cfg)
    assert first["epoch"] < 29 and first["global_step"] in first["steps"]
    again = train(cfg)
    assert again["restored"] == first["global_step"]
    assert again["trace"] == [], "a run EarlyStopping ended trains again when requeued"


def test_early_stopping_on_validation_requeued_trains_nothing(tmp_path: Path) -> None:
    es = {**ES, "check_on_train_epoch_end": False}
    cfg = {"save": {"steps": 2}, "max_epochs": 30, "early_stop": es, "root": str(tmp_path / "run")}
    first = train(cfg)
    assert first["epoch"] < 29
    again = train(cfg)
    assert again["restored"] == first["global_step"]
    assert again["trace"] == []


def test_keep_best_resumes_bitwise_and_keeps_the_same_checkpoints(tmp_path: Path) -> None:
    cfg = {"save": {"steps": 5}, "max_epochs": 6,
           "keep": {"last": 1, "best": 2, "monitor": "val_loss", "mode": "min"}}  # fmt: skip
    ref, resumed = crash_and_resume(cfg, kill_step(9, 11, 28), tmp_path)
    assert_bitwise(ref, resumed)
    assert resumed["steps"] == ref["steps"]


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_every_epochs_2_final_save_off_schedule_then_larger_max_epochs_after_a_crash(
    tmp_path: Path,
) -> None:
    """max_epochs=3 with Every(epochs=2): the end (step 15) is saved only by save_on_train_end;
    then max_epochs=6, killed at a random step, run again: equal to an uninterrupted 6 epochs."""
    cfg = {"save": {"epochs": 2}}
    ref = train({**cfg, "max_epochs": 6, "root": str(tmp_path / "ref")})
    run = str(tmp_path / "run")
    first = train({**cfg, "max_epochs": 3, "root": run})
    assert first["steps"] == [10, 15]
    rc, _, err = run_script({**cfg, "max_epochs": 6, "root": run, "kill_at": kill_step(10, 16, 29)})
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "max_epochs": 6, "root": run})
    assert_bitwise(ref, resumed)


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_val_check_interval_across_epochs_with_accumulation_resumes_bitwise(tmp_path: Path) -> None:
    """val_check_interval=7 batches with check_val_every_n_epoch=None (validation crosses epoch
    ends), accumulate_grad_batches=2, Every(steps=2)."""
    cfg = {"save": {"steps": 2}, "max_epochs": 4, "val_check_interval": 7,
           "check_val_every_n_epoch": None, "accumulate": 2}  # fmt: skip
    ref, resumed = crash_and_resume(cfg, kill_step(11, 3, 10), tmp_path)
    assert ref["validations"] > 0
    assert_bitwise(ref, resumed)


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_keep_best_with_val_check_interval_float_resumes_bitwise(tmp_path: Path) -> None:
    """(Killed at step 16, sync saves: restored from 16, a mid-epoch step; the epoch-end case
    is the test below.)"""
    cfg = {"save": {"steps": 2}, "max_epochs": 4, "val_check_interval": 0.5, "async_save": False,
           "keep": {"last": 1, "best": 3, "monitor": "val_loss", "mode": "min"}}  # fmt: skip
    ref, resumed = crash_and_resume(cfg, 16, tmp_path)
    assert resumed["restored"] == 16
    assert_bitwise(ref, resumed)
    assert resumed["steps"] == ref["steps"]


@pytest.mark.parametrize(
    "interval",
    [pytest.param(2, marks=pytest.mark.slow), 0.5],  # CI < 20 min
    ids=["val_check_interval=2", "val_check_interval=0.5"],
)
def test_save_at_an_epochs_last_batch_with_mid_epoch_validation_resumes_bitwise(
    tmp_path: Path, interval: float
) -> None:
    cfg = {"save": {"steps": 5}, "max_epochs": 4, "val_check_interval": interval,
           "async_save": False}  # fmt: skip
    ref, resumed = crash_and_resume(cfg, 12, tmp_path)  # sync: restored from step 10
    assert resumed["restored"] == 10
    assert_bitwise(ref, resumed)


@pytest.mark.slow  # ~17-20 s: the same promise is in CI through faster tests
def test_requeue_of_a_finished_run_in_a_new_process_trains_nothing(tmp_path: Path) -> None:
    cfg = {"save": {"steps": 4}, "max_epochs": 2, "root": str(tmp_path / "run")}
    rc, first, err = run_script(cfg)
    assert rc == 0 and first is not None, err
    rc, again, err = run_script(cfg)
    assert rc == 0 and again is not None, err
    assert again["trace"] == [] and again["restored"] == 10
    assert again["fingerprint"] == first["fingerprint"] and again["steps"] == first["steps"]


if __name__ == "__main__":
    result = train(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
