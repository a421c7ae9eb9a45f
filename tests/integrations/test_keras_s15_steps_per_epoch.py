"""Keras ``fit(steps_per_epoch=S)`` killed (SIGKILL) or stopped (SIGTERM) and resumed: each run
compared bitwise (every model and optimizer variable) with an uninterrupted one.

Keras 3 with ``steps_per_epoch`` keeps one iterator of the loader across epochs: an epoch takes
S batches from it, or fewer where the loader's pass ends ("ran out of data"), and the next pass
starts with the next epoch. The resumed fit must draw exactly those batches: the kill positions
below cover a resume mid-epoch before and after the pass ended, at an epoch's end with the pass
going on or just rebuilt, S dividing the loader's length, S longer than one pass, an endless
(repeated) stateful loader, and a SIGTERM at an epoch's last batch.

This file is also the training script its tests start (``python this_file.py JSON``)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)
pytest.importorskip("keras")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
try:
    import test_outside_s14b_keras as base  # noqa: E402  (the model, data, fingerprint)
finally:
    sys.path.remove(str(HERE.parent))

pytestmark = [
    pytest.mark.filterwarnings("ignore:Your input ran out of data"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Endless(IterableDataset):
    """A repeated stream (no length): sample i of an endless seeded sequence; its position is
    its state (torchdata asks an IterableDataset for state_dict/load_state_dict)."""

    def __init__(self) -> None:
        self.i = 0
        self.x = base.data().tensors

    def __iter__(self) -> Any:
        while True:
            k = self.i % len(self.x[0])
            self.i += 1
            yield self.x[0][k] * (1 + self.i // 48), self.x[1][k]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = int(state["i"])


class Signal(keras.callbacks.Callback):
    """Sends SIGTERM to this process after step ``at`` (placed before the savegame callback, so
    it sees the signal at the same batch's end)."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if sgk._iterations(self.model) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    model = base.build()
    if cfg.get("endless"):
        loader = StatefulDataLoader(Endless(), batch_size=base.BATCH)
    else:
        loader = StatefulDataLoader(base.data(), batch_size=base.BATCH, shuffle=True)
    cb = sgk.SavegameCheckpoint(cfg["root"], loader=loader, save=sg.Every(**cfg["save"]),
                                keep=sg.Keep(last=50), async_save=False, verbose=0)  # fmt: skip
    steps = base.Steps(cfg.get("kill_at"), None)
    val = base.data(16, seed=2).tensors
    hist = model.fit(loader, epochs=cfg["epochs"], steps_per_epoch=cfg["steps_per_epoch"],
                     validation_data=(val[0].numpy(), val[1].numpy()),
                     callbacks=[Signal(cfg.get("signal_at")), cb, steps], shuffle=False, verbose=0)  # fmt: skip
    with sg.Checkpointer(cfg["root"], handle_signals=False) as ck:
        saved = sorted(c.step for c in ck.list() if c.valid)
    return {
        "fingerprint": base.fingerprint(model),
        "restored": cb.restored_step,
        "trained": steps.batches,
        "iterations": int(sgk._iterations(model)),
        "steps": saved,
        "val_loss": [float(x) for x in hist.history["val_loss"]],
    }


def run_script(cfg: dict[str, Any]) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(HERE), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "KERAS_BACKEND": "torch", "PYTHONHASHSEED": "0"},
    )
    return proc.returncode, proc.stderr[-3000:]


_REFS: dict[str, dict[str, Any]] = {}


def reference(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    key = json.dumps(cfg, sort_keys=True)
    if key not in _REFS:
        _REFS[key] = train({**cfg, "root": str(tmp / "ref")})
    return _REFS[key]


def interrupted(cfg: dict[str, Any], tmp: Path, **how: int) -> dict[str, Any]:
    """Run ``cfg`` in a process killed (kill_at) or signalled (signal_at), then resume it here."""
    rc, err = run_script({**cfg, "root": str(tmp / "run"), **how})
    expected = -signal.SIGKILL if "kill_at" in how else 75
    assert rc == expected, err
    return train({**cfg, "root": str(tmp / "run")})


def assert_same_run(ref: dict[str, Any], resumed: dict[str, Any], restored: int) -> None:
    assert resumed["restored"] == restored
    assert resumed["iterations"] == ref["iterations"]
    assert resumed["trained"] == ref["iterations"] - restored
    assert resumed["fingerprint"] == ref["fingerprint"]
    n = len(resumed["val_loss"])
    assert resumed["val_loss"] == ref["val_loss"][-n:]


# S=4 over a 6-batch loader, 3 epochs: 4 | 2 (ran out) | 4 batches = 10 steps
SHORT = {"epochs": 3, "steps_per_epoch": 4}


@pytest.mark.parametrize(
    ("save", "kill_at", "restored"),
    [
        # (each case 15-25 s: CI runs the last; the rest with -m slow)
        pytest.param(
            {"steps": 1}, 2, 2, marks=pytest.mark.slow
        ),  # epoch 1, batch 2: the pass goes on into epoch 2
        pytest.param(
            {"steps": 1}, 6, 6, marks=pytest.mark.slow
        ),  # epoch 2's last batch, where the pass ended (ran out)
        pytest.param(
            {"steps": 1}, 8, 8, marks=pytest.mark.slow
        ),  # epoch 3, in the second pass, after the loader ran out once
        pytest.param(
            {"epochs": 1}, 5, 4, marks=pytest.mark.slow
        ),  # epoch 1's end: the pass half used, held across epochs
        ({"epochs": 1}, 8, 6),  # epoch 2's end, after it ran out: the next pass just built
    ],
)
def test_steps_per_epoch_shorter_than_the_loader(
    tmp_path: Path, save: dict[str, int], kill_at: int, restored: int
) -> None:
    cfg = {**SHORT, "save": save}
    ref = reference(cfg, tmp_path)
    assert ref["iterations"] == 10
    assert_same_run(ref, interrupted(cfg, tmp_path, kill_at=kill_at), restored)


@pytest.mark.slow  # 13-14 s each
@pytest.mark.parametrize(("kill_at", "restored"), [(4, 4), (7, 6)])
def test_steps_per_epoch_dividing_the_loader(tmp_path: Path, kill_at: int, restored: int) -> None:
    """S=3 over 6 batches: two epochs per pass, no epoch runs out."""
    cfg = {"epochs": 4, "steps_per_epoch": 3, "save": {"steps": 2}}
    ref = reference(cfg, tmp_path)
    assert ref["iterations"] == 12
    assert_same_run(ref, interrupted(cfg, tmp_path, kill_at=kill_at), restored)


@pytest.mark.parametrize(
    ("kill_at", "restored"),
    [pytest.param(5, 4, marks=pytest.mark.slow), pytest.param(9, 8, marks=pytest.mark.slow)],
)
def test_steps_per_epoch_longer_than_one_pass(tmp_path: Path, kill_at: int, restored: int) -> None:
    """S=8 over 6 batches: Keras runs out after 6 batches every epoch (and warns)."""
    cfg = {"epochs": 2, "steps_per_epoch": 8, "save": {"steps": 4}}
    ref = reference(cfg, tmp_path)
    assert ref["iterations"] == 12
    assert_same_run(ref, interrupted(cfg, tmp_path, kill_at=kill_at), restored)


@pytest.mark.parametrize(
    ("kill_at", "restored"),
    [pytest.param(5, 4, marks=pytest.mark.slow), pytest.param(7, 6, marks=pytest.mark.slow)],
)
def test_steps_per_epoch_over_an_endless_stateful_loader(
    tmp_path: Path, kill_at: int, restored: int
) -> None:
    """A repeated stream (an IterableDataset with no length): S=4 per epoch, never running out."""
    cfg = {"epochs": 3, "steps_per_epoch": 4, "save": {"steps": 2}, "endless": True}
    ref = reference(cfg, tmp_path)
    assert ref["iterations"] == 12
    assert_same_run(ref, interrupted(cfg, tmp_path, kill_at=kill_at), restored)


@pytest.mark.parametrize(
    ("steps_per_epoch", "signal_at"),
    # the pass goes on after step 4 (S=4); it ends with step 6 (S=3)
    [pytest.param(4, 4, marks=pytest.mark.slow), (3, 6)],
)
def test_sigterm_at_an_epochs_last_batch(
    tmp_path: Path, steps_per_epoch: int, signal_at: int
) -> None:
    """SIGTERM at an epoch's last batch saves that batch's end mid-epoch (nothing left of it to
    train), exit status 75: the resumed fit runs that epoch's validation and goes on as the
    uninterrupted run did."""
    cfg = {"epochs": 3, "steps_per_epoch": steps_per_epoch, "save": {"steps": 5}}
    ref = reference(cfg, tmp_path)
    assert_same_run(ref, interrupted(cfg, tmp_path, signal_at=signal_at), signal_at)


def test_a_keras_without_a_readable_fit_refuses_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fit's epoch iterator cannot be found (another Keras), a steps_per_epoch resume would
    draw other batches: refused at restore, before anything is trained."""
    cfg = {**SHORT, "save": {"steps": 1}, "epochs": 1, "root": str(tmp_path / "run")}
    train(cfg)
    monkeypatch.setattr(sgk, "_epoch_iterator", lambda model: None)
    with pytest.raises(sgk.UnsupportedSetupError, match="steps_per_epoch=4"):
        train({**cfg, "epochs": 2})
    monkeypatch.undo()  # the run folder was released: the next fit resumes it
    again = train({**cfg, "epochs": 2})
    assert again["restored"] == 4 and again["iterations"] == 6


if __name__ == "__main__":
    print("RESULT " + json.dumps(train(json.loads(sys.argv[1]))), flush=True)
