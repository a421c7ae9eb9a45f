"""Lightning: resumes from a save at an epoch's last batch, and EarlyStopping across a crash or a
requeue (s15). The save points at an epoch's end are the ones where Lightning restarts "before
the epoch end" and runs the epoch-end hooks again: the run must train the epochs it did, and
EarlyStopping must have made exactly the checks the uninterrupted run made (its wait_count,
best_score and stopped_epoch equal), with the metrics it read then.

This file is also the training script its tests start (``python this_file.py JSON``), so the
SIGKILL is a real one. The model, data and fingerprint are those of the s14b outside review
(test_outside_s14b_lightning.py)."""

from __future__ import annotations

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
from torch.utils.data import DataLoader  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import lightning as sgl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from test_outside_s14b_lightning import BATCH, Kill, Net, data, fingerprint  # noqa: E402
finally:
    sys.path.pop(0)

HERE = Path(__file__).resolve()

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class EpochEnds(pl.Callback):
    """Counts the epoch-end hooks each epoch gets, and what they read."""

    def __init__(self) -> None:
        self.seen: list[list[Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val = trainer.callback_metrics.get("val_loss")
        self.seen.append([int(trainer.current_epoch), None if val is None else float(val)])


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    trace: list[list[int]] = []
    model = Net(trace)
    loader = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    val = DataLoader(data(16, seed=2), batch_size=16)
    cb = sgl.SavegameCallback(
        cfg["root"],
        save=sg.Every(**cfg["save"]),
        keep=sg.Keep(last=50),
        async_save=cfg.get("async_save", False),
        cache=cfg.get("cache"),
    )
    ends = EpochEnds()
    callbacks: list[pl.Callback] = [cb, ends]
    es = None
    if cfg.get("early_stop"):
        es = pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", **cfg["early_stop"])
        callbacks.append(es)
    if cfg.get("kill_at") is not None:
        callbacks.append(Kill(cfg["kill_at"], cb, wait=True))
    trainer = pl.Trainer(
        max_steps=cfg.get("max_steps", -1),
        max_epochs=cfg.get("max_epochs", -1 if cfg.get("max_steps") else 3),
        min_epochs=cfg.get("min_epochs"),
        val_check_interval=cfg.get("val_check_interval"),
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
        "steps": steps,
        "epoch_ends": ends.seen,
        "es": None
        if es is None
        else [es.wait_count, float(es.best_score), es.stopped_epoch, bool(trainer.should_stop)],
    }


def run_script(cfg: dict[str, Any]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(HERE), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return proc.returncode, proc.stderr[-3000:]


def crash_and_resume(cfg: dict[str, Any], kill_at: int, tmp: Path) -> tuple[dict, dict]:
    ref = train({**cfg, "root": str(tmp / "ref")})
    rc, err = run_script({**cfg, "root": str(tmp / "run"), "kill_at": kill_at})
    assert rc == -signal.SIGKILL, err
    return ref, train({**cfg, "root": str(tmp / "run")})


def assert_same_run(ref: dict[str, Any], resumed: dict[str, Any]) -> None:
    restored = resumed["restored"] or 0
    assert resumed["global_step"] == ref["global_step"]
    assert resumed["epoch"] == ref["epoch"]
    assert resumed["trace"] == [t for t in ref["trace"] if t[0] >= restored]
    assert resumed["fingerprint"] == ref["fingerprint"]
    assert resumed["es"] == ref["es"], "EarlyStopping made other checks than the uninterrupted run"
    # the epoch-end hooks the resumed run ran, each once and reading the same val_loss
    ran = len(resumed["epoch_ends"])
    assert resumed["epoch_ends"] == (ref["epoch_ends"][-ran:] if ran else [])


ES = {"patience": 1, "min_delta": 0.05}  # stops at step 40 (epoch 8 of 30) in the s14b setup


@pytest.mark.parametrize("kill_at", [12, pytest.param(27, marks=pytest.mark.slow)])  # CI: one
def test_early_stopping_resumed_from_a_save_at_an_epochs_end_checks_once_per_epoch(
    tmp_path: Path, kill_at: int
) -> None:
    """Every(steps=5) over 5-batch epochs: every save is at an epoch's last batch (at its
    validation's end); EarlyStopping checks at the epoch's end (its default here). Lightning
    restarts before the epoch end and runs it again: EarlyStopping must find val_loss there and
    count that epoch once."""
    cfg = {"save": {"steps": 5}, "max_epochs": 30, "early_stop": ES}
    ref, resumed = crash_and_resume(cfg, kill_at, tmp_path)
    assert ref["epoch"] < 29, "EarlyStopping never stopped: the test needs another setting"
    assert resumed["restored"] == kill_at - kill_at % 5
    assert_same_run(ref, resumed)


def test_early_stopping_on_validation_resumed_makes_the_same_checks(tmp_path: Path) -> None:
    """check_on_train_epoch_end=False: EarlyStopping checks in on_validation_end, where the
    save is; listed after SavegameCallback (as users do), the save must still hold its check."""
    es = {**ES, "check_on_train_epoch_end": False}
    cfg = {"save": {"steps": 5}, "max_epochs": 30, "early_stop": es}
    ref, resumed = crash_and_resume(cfg, 22, tmp_path)
    assert ref["epoch"] < 29
    assert resumed["restored"] == 20
    assert_same_run(ref, resumed)


@pytest.mark.parametrize("check_on_epoch_end", [True, False])
def test_a_run_early_stopping_ended_requeued_with_more_epochs_trains_nothing(
    tmp_path: Path, check_on_epoch_end: bool
) -> None:
    """The stop is part of the run: a requeue with a larger max_epochs stops where the
    uninterrupted run with that max_epochs stops (EarlyStopping does not depend on it)."""
    es = {**ES, "check_on_train_epoch_end": check_on_epoch_end}
    cfg = {"save": {"steps": 3}, "early_stop": es, "root": str(tmp_path / "run")}
    first = train({**cfg, "max_epochs": 30})
    assert first["epoch"] < 29 and first["es"][3] is True
    again = train({**cfg, "max_epochs": 60})
    assert again["restored"] == first["global_step"]
    assert again["trace"] == [] and again["global_step"] == first["global_step"]
    assert again["fingerprint"] == first["fingerprint"]


@pytest.mark.slow  # CI under 20 minutes
def test_min_epochs_keeps_training_after_the_restored_stop_as_uninterrupted(
    tmp_path: Path,
) -> None:
    """should_stop set with min_epochs not met: Lightning trains on (and EarlyStopping keeps
    checking); a run killed in that stretch resumes to the same end."""
    cfg = {"save": {"steps": 5}, "max_epochs": 30, "min_epochs": 12, "early_stop": ES}
    ref, resumed = crash_and_resume(cfg, 47, tmp_path)
    assert 12 <= ref["epoch"] < 29
    assert_same_run(ref, resumed)


@pytest.mark.slow  # ~20 s; CI: test_outside_s14b_lightning's max_epochs then more
def test_max_epochs_then_more_with_mid_epoch_validation(tmp_path: Path) -> None:
    """Validation mid-epoch only, so the end of fit (step 10, the last batch of epoch 2) is
    saved in on_train_batch_end's state: requeued it trains nothing; then 4 epochs, killed, run
    again: equal to an uninterrupted 4-epoch run, twice killed."""
    cfg = {"save": {"steps": 3}, "val_check_interval": 2}
    ref = train({**cfg, "max_epochs": 4, "root": str(tmp_path / "ref")})
    run = str(tmp_path / "run")
    first = train({**cfg, "max_epochs": 2, "root": run})
    assert first["global_step"] == 10 and 10 in first["steps"]
    again = train({**cfg, "max_epochs": 2, "root": run})
    assert again["trace"] == [] and again["restored"] == 10
    for kill_at in (14, 17):
        rc, err = run_script({**cfg, "max_epochs": 4, "root": run, "kill_at": kill_at})
        assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "max_epochs": 4, "root": run})
    assert resumed["restored"] == 15
    assert_same_run(ref, resumed)


@pytest.mark.parametrize("kill_at", [13, pytest.param(22, marks=pytest.mark.slow)])  # CI: one
def test_every_epochs_counts_each_epoch_once_across_a_restart_before_the_epoch_end(
    tmp_path: Path, kill_at: int
) -> None:
    """Every(epochs=2) with validation mid-epoch only: the save at epoch 2's end (step 10)
    carries the loop state of its last batch, so Lightning restarts before that epoch end and
    runs it again. The checkpoint had counted that epoch: the resumed run saves at the same
    steps as the uninterrupted one (20, 30), not one epoch early."""
    cfg = {"save": {"epochs": 2}, "max_epochs": 6, "val_check_interval": 2}
    ref, resumed = crash_and_resume(cfg, kill_at, tmp_path)
    assert ref["steps"] == [10, 20, 30]
    assert resumed["restored"] == kill_at - kill_at % 10
    assert_same_run(ref, resumed)
    assert resumed["steps"] == ref["steps"]


def test_cache_folder_with_a_remote_run_resumes_from_the_remote_on_a_new_machine(
    tmp_path: Path,
) -> None:
    """SavegameCallback(url, cache=folder) (docs/tiers.md): saves commit into the cache and
    upload to the run; the end of fit waits for the uploads. A job on another machine (an empty
    cache folder) resumes from the remote run alone, bitwise equal to an uninterrupted run."""
    remote = (tmp_path / "remote-run").as_uri()
    cfg = {"save": {"steps": 4}, "async_save": True}
    ref = train({**cfg, "max_steps": 17, "root": str(tmp_path / "ref")})
    first = train({**cfg, "max_steps": 7, "root": remote, "cache": str(tmp_path / "cache-a")})
    assert first["steps"] == [4, 7]  # listed from the remote run: uploaded
    with sg.Checkpointer(tmp_path / "cache-a", handle_signals=False) as local:
        assert 7 in [c.step for c in local.list() if c.valid]
    more = train({**cfg, "max_steps": 17, "root": remote, "cache": str(tmp_path / "cache-b")})
    assert more["restored"] == 7 and more["steps"][-1] == 17
    assert_same_run(ref, more)


if __name__ == "__main__":
    result = train(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
