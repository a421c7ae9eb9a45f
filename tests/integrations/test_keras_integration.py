"""Keras 3 (torch backend) + savegame (issue 12): a ``model.fit`` SIGKILLed at random steps and
resumed ends bitwise equal to the uninterrupted run (weights, optimizer variables, the epoch
logs), mid-epoch included; damaged newest checkpoints are skipped; best-K survives restarts;
bad input is refused or warned about.

Keras on the torch backend is deterministic on CPU for this model: dropout draws from the
layer's own SeedGenerator (a variable, saved with the model), the loader shuffles from the
global torch RNG (saved), so every resume test checks bit equality.

This file is also the training script of its subprocess trials (``python THIS_FILE ...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover - another backend was chosen
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)
pytest.importorskip("keras")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402

SAMPLES, BATCH, EPOCHS = 48, 8, 3  # 6 steps per epoch, 18 in all
STEPS = EPOCHS * SAMPLES // BATCH
HERE = Path(__file__).resolve()

# The resumed epoch is shorter than len(loader): Keras says its input "ran out of data" there;
# the callback silences exactly that message for the resumed epoch; a SIGTERM'd fit in this
# process (not resumed) never gets there. Keras' progress bar is off (verbose=0).
pytestmark = [pytest.mark.filterwarnings("ignore:Your input ran out of data")]


def data(n: int = SAMPLES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)))


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


class Trace(keras.callbacks.Callback):
    def __init__(self, kill_at: int | None, how: int, during: bool) -> None:
        super().__init__()
        self.kill_at, self.how, self.during = kill_at, how, during
        self.epochs: dict[int, dict[str, float]] = {}

    def _iterations(self) -> int:
        return sgk._iterations(self.model)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.during and self._iterations() + 1 == self.kill_at:
            os.kill(os.getpid(), self.how)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if not self.during and self._iterations() == self.kill_at:
            os.kill(os.getpid(), self.how)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs[epoch] = {k: float(v) for k, v in (logs or {}).items()}


@contextlib.contextmanager
def expect_warning(category: type[Warning], match: str) -> Iterator[None]:
    """pytest.warns, but ignoring other warnings: pytest.warns re-raises torch's own
    DeprecationWarnings (which the suite's filters ignore) as errors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", category)
        yield
    messages = [str(w.message) for w in caught if issubclass(w.category, category)]
    assert any(re.search(match, m) for m in messages), messages


def fingerprint(model: keras.Model) -> str:
    h = hashlib.sha256()
    for v in [*model.variables, *model.optimizer.variables]:
        h.update(str(tuple(v.shape)).encode())  # not v.path: Keras numbers names per process
        h.update(sgk._tensor(v).contiguous().numpy().tobytes())
    return h.hexdigest()


class Recorder(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The dataset, recording which samples were read (num_workers=0: in this process)."""

    def __init__(self, ds: TensorDataset, seen: list[int]) -> None:
        self.ds, self.seen = ds, seen

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        self.seen.append(int(i))
        return self.ds[i]


def train(
    root: str | os.PathLike[str],
    *,
    kill_at: int | None = None,
    how: int = signal.SIGKILL,
    during: bool = False,
    save: sg.Every | None = None,
    keep: sg.Keep | None = None,
    plain_loader: bool = False,
    no_loader: bool = False,
    epochs: int = EPOCHS,
    async_save: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    seen: list[int] = []
    model = build()
    kind = DataLoader if plain_loader else StatefulDataLoader
    loader = kind(Recorder(data(), seen), batch_size=BATCH, shuffle=True)
    val = data(16, seed=2).tensors
    cb = sgk.SavegameCheckpoint(
        root,
        loader=None if no_loader else loader,
        save=save or sg.Every(steps=2),
        keep=keep or sg.Keep(last=2),
        async_save=async_save,
        verbose=0,
    )
    trace = Trace(kill_at, how, during)
    model.fit(
        loader,
        epochs=epochs,
        validation_data=(val[0].numpy(), val[1].numpy()),
        callbacks=[cb, trace],
        shuffle=False,  # the loader shuffles; Keras warns that its own shuffle does not apply
        verbose=0,
    )
    return {
        "fingerprint": fingerprint(model),
        # fit() first reads one batch to build the compiled metrics (before any callback runs,
        # from an iterator it then drops): the samples trained on are the rest
        "seen": seen[BATCH:],
        "restored": cb.restored_step,
        "epochs": trace.epochs,
        "iterations": sgk._iterations(model),
    }


def run_killed(root: Path, kill_at: int) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "KERAS_BACKEND": "torch"}
    cmd = [sys.executable, str(HERE), str(root), str(kill_at)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train(tmp_path_factory.mktemp("keras-ref"))


def _check_resumed(reference: dict[str, Any], resumed: dict[str, Any]) -> None:
    start = resumed["restored"]
    assert start is not None and start > 0
    assert resumed["iterations"] == STEPS
    # the samples read after the resume are exactly the rest of the uninterrupted run's
    assert resumed["seen"] == reference["seen"][start * BATCH :]
    assert resumed["fingerprint"] == reference["fingerprint"]
    # epoch logs (running means over the whole epoch, validation) of the epochs it finished
    for epoch, logs in resumed["epochs"].items():
        assert logs == reference["epochs"][epoch], epoch


def test_uninterrupted_reference_is_deterministic(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    again = train(tmp_path)
    assert again["fingerprint"] == reference["fingerprint"]
    assert len(reference["seen"]) == STEPS * BATCH


# mid-epoch (epoch 1, batch 3); right after an epoch's end (step 12 is saved at on_epoch_end)
@pytest.mark.parametrize("kill_at", [9, pytest.param(13, marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bitwise_equal(
    reference: dict[str, Any], tmp_path: Path, kill_at: int
) -> None:
    run_killed(tmp_path, kill_at)
    resumed = train(tmp_path)
    assert resumed["restored"] == kill_at - kill_at % 2  # Every(steps=2); 12 at on_epoch_end
    _check_resumed(reference, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5))
def test_sigkill_at_random_steps_resume_is_bitwise_equal(
    reference: dict[str, Any], tmp_path: Path, trial: int
) -> None:
    rnd = random.Random(2000 + trial)
    kill_at = rnd.randint(2, STEPS - 1)
    run_killed(tmp_path, kill_at)
    if trial % 2:
        second = rnd.randint(kill_at + 1, STEPS)
        if second < STEPS:
            run_killed(tmp_path, second)
    _check_resumed(reference, train(tmp_path))


@pytest.mark.parametrize("during", [True, False], ids=["during-step-9", "after-step-9"])
def test_sigterm_saves_at_the_batch_end_and_exits_75(
    reference: dict[str, Any], tmp_path: Path, during: bool
) -> None:
    sparse = sg.Every(steps=1000)
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, kill_at=9, how=signal.SIGTERM, during=during, save=sparse)
    assert exit_info.value.code == 75
    with sg.Checkpointer(tmp_path, handle_signals=False) as ck:
        assert [c.step for c in ck.list() if c.valid] == [9 if during else 10]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    _check_resumed(reference, train(tmp_path, save=sparse))


def test_resume_skips_a_damaged_newest_checkpoint(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        train(tmp_path, kill_at=10, how=signal.SIGTERM, keep=sg.Keep(last=3))
    newest = tmp_path / "step-000000000011"
    assert newest.is_dir()
    tensors = next(newest.glob("*.safetensors"))
    raw = bytearray(tensors.read_bytes())
    raw[-5] ^= 0x10
    tensors.write_bytes(bytes(raw))
    (tmp_path / ".tmp-step-000000000012").mkdir()  # a half-written save
    # (recorded by hand: pytest.warns would re-raise torch's own DeprecationWarnings, which the
    # suite's filters ignore, as errors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", sg.CorruptCheckpointWarning)
        resumed = train(tmp_path)
    assert any(issubclass(w.category, sg.CorruptCheckpointWarning) for w in caught)
    assert resumed["restored"] == 10
    _check_resumed(reference, resumed)


def test_async_save_resumes_bitwise(reference: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train(tmp_path, kill_at=7, how=signal.SIGTERM, async_save=True)
    _check_resumed(reference, train(tmp_path, async_save=True))


def test_best_k_survives_restarts_with_keras_log_lines(
    reference: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = sg.Keep(last=1, best=2, monitor="val_loss", mode="min")
    with pytest.raises(SystemExit):
        train(tmp_path, kill_at=8, how=signal.SIGTERM, save=sg.Every(epochs=1), keep=keep)
    resumed = train(tmp_path, save=sg.Every(epochs=1), keep=keep)
    vals = {e: logs["val_loss"] for e, logs in reference["epochs"].items()}
    assert resumed["epochs"][2]["val_loss"] == vals[2]
    best_epochs = sorted(vals, key=vals.get)[:2]
    with sg.Checkpointer(tmp_path, handle_signals=False, keep=keep) as ck:
        infos = [c for c in ck.list() if c.kind == "checkpoint"]
    kept = {c.step for c in infos if c.kept_for}
    assert kept == {(e + 1) * SAMPLES // BATCH for e in best_epochs} | {STEPS}, [
        (c.step, c.kept_for) for c in infos
    ]


def test_keras_style_log_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build()
    loader = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    val = data(16, seed=2).tensors
    cb = sgk.SavegameCheckpoint(
        tmp_path, loader=loader, keep=sg.Keep(last=1, best=1, monitor="val_loss", mode="min")
    )
    model.fit(
        loader,
        epochs=3,
        validation_data=(val[0].numpy(), val[1].numpy()),
        callbacks=[cb],
        shuffle=False,
        verbose=0,
    )
    out = capsys.readouterr().out
    assert "Epoch 1: val_loss improved from inf to " in out
    assert "saving checkpoint to" in out and "step-000000000006" in out


def test_plain_dataloader_warns_with_the_fix(tmp_path: Path) -> None:
    with expect_warning(sgk.ExactnessWarning, "StatefulDataLoader"):
        train(tmp_path, plain_loader=True, epochs=1)


def test_mid_epoch_checkpoint_without_a_loader_warns(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train(tmp_path, kill_at=3, how=signal.SIGTERM, no_loader=True, epochs=1)
    with expect_warning(sgk.ExactnessWarning, "restarts from its first batch"):
        train(tmp_path, no_loader=True, epochs=1)


def test_monitor_never_logged_warns(tmp_path: Path) -> None:
    keep = sg.Keep(best=1, monitor="val_accuracy", mode="max")
    with expect_warning(sgk.MonitorWarning, "val_accuracy.*logged: \\['loss', 'val_loss'\\]"):
        train(tmp_path, keep=keep, epochs=1)


def test_wrong_keras_version_or_backend_is_refused() -> None:
    with pytest.raises(sg.MissingDependencyError, match=r"keras>=3\.5,<4"):
        sgk.check_version("2.15.0")
    with pytest.raises(ImportError, match="KERAS_BACKEND=torch"):
        sgk.check_version("3.15.1", backend="tensorflow")
    assert sgk.check_version("3.15.1", backend="torch") == "3.15.1"


if __name__ == "__main__":
    train(sys.argv[1], kill_at=int(sys.argv[2]))
