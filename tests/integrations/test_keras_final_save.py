"""Keras 3 (torch backend): ``SavegameCheckpoint(save_on_train_end=True)`` saves the end of fit.

``fit`` ends with an epoch's end, where the callback offers the step to the schedule: with the
default ``Every(epochs=1)`` that is a save, but with a schedule in steps (``Every(steps=5)``
and 12 steps) the steps after the last scheduled save were not saved, and the finished run
started again trained them again. Now the end of a normal ``fit`` is saved (unless saved
already): started again it trains nothing; continued to more epochs it ends bitwise equal to
an uninterrupted run; a ``fit`` stopped mid-epoch (``model.stop_training``) saves its position
in the epoch; a ``fit`` that raises saves nothing more than its schedule did.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
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
from torch.utils.data import TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402

SAMPLES, BATCH = 48, 8  # 6 steps per epoch

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


class Recorder(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The dataset, recording which samples were read."""

    def __init__(self, ds: TensorDataset, seen: list[int]) -> None:
        self.ds, self.seen = ds, seen

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        self.seen.append(int(i))
        return self.ds[i]


class Steps(keras.callbacks.Callback):
    """Counts the batches trained; stops fit (``stop_training``) or raises after step ``at``."""

    def __init__(self, stop_at: int | None = None, raise_at: int | None = None) -> None:
        super().__init__()
        self.stop_at, self.raise_at, self.batches = stop_at, raise_at, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches += 1
        step = sgk._iterations(self.model)
        if step == self.raise_at:
            raise RuntimeError(f"boom after step {step}")
        if step == self.stop_at:
            self.model.stop_training = True


def fingerprint(model: keras.Model) -> str:
    h = hashlib.sha256()
    for v in [*model.variables, *model.optimizer.variables]:
        h.update(str(tuple(v.shape)).encode())
        h.update(sgk._tensor(v).contiguous().numpy().tobytes())
    return h.hexdigest()


def valid_steps(root: Path) -> list[int]:
    with sg.Checkpointer(root, handle_signals=False) as ck:
        return sorted(c.step for c in ck.list() if c.valid)


def train(
    root: Path,
    *,
    epochs: int = 2,
    every: int = 5,
    save_on_train_end: bool = True,
    stop_at: int | None = None,
    raise_at: int | None = None,
    async_save: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    seen: list[int] = []
    model = build()
    loader = StatefulDataLoader(Recorder(data(), seen), batch_size=BATCH, shuffle=True)
    val = data(16, seed=2).tensors
    cb = sgk.SavegameCheckpoint(
        root,
        loader=loader,
        save=sg.Every(steps=every),
        keep=sg.Keep(last=10),
        async_save=async_save,
        save_on_train_end=save_on_train_end,
        verbose=0,
    )
    steps = Steps(stop_at, raise_at)
    model.fit(
        loader,
        epochs=epochs,
        validation_data=(val[0].numpy(), val[1].numpy()),
        callbacks=[cb, steps],
        shuffle=False,
        verbose=0,
    )
    return {
        "fingerprint": fingerprint(model),
        # fit() first reads one batch to build the compiled metrics (before any callback runs,
        # from an iterator it then drops): the samples trained on are the rest
        "seen": seen[BATCH:],
        "restored": cb.restored_step,
        "trained": steps.batches,
        "iterations": sgk._iterations(model),
        "steps": valid_steps(root),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Uninterrupted, 3 epochs (18 steps)."""
    return train(tmp_path_factory.mktemp("keras-final-ref"), epochs=3)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_finished_run_saves_its_end_and_started_again_trains_nothing(
    tmp_path: Path, async_save: bool
) -> None:
    first = train(tmp_path, async_save=async_save)
    assert first["iterations"] == 12
    assert first["steps"] == [5, 10, 12]  # the schedule's, and the end of fit
    again = train(tmp_path, async_save=async_save)
    assert again["restored"] == 12
    assert again["trained"] == 0 and again["seen"] == []
    assert again["iterations"] == 12
    assert again["fingerprint"] == first["fingerprint"]
    assert again["steps"] == [5, 10, 12]  # nothing saved by the fit that trained nothing


def test_more_epochs_from_the_final_save_equal_the_uninterrupted_run(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    train(tmp_path, epochs=2)
    more = train(tmp_path, epochs=3)
    assert more["restored"] == 12
    assert more["trained"] == 6
    assert more["seen"] == reference["seen"][12 * BATCH :]
    assert more["fingerprint"] == reference["fingerprint"]
    assert more["steps"] == [5, 10, 12, 15, 18]


def test_stop_training_mid_epoch_saves_the_position_in_the_epoch(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    stopped = train(tmp_path, epochs=3, stop_at=9)  # epoch 2, batch 3
    assert stopped["iterations"] == 9
    assert stopped["steps"] == [5, 9]
    more = train(tmp_path, epochs=3)
    assert more["restored"] == 9
    assert more["seen"] == reference["seen"][9 * BATCH :]
    assert more["fingerprint"] == reference["fingerprint"]


def test_save_on_train_end_false_keeps_only_the_schedule(tmp_path: Path) -> None:
    first = train(tmp_path, save_on_train_end=False)
    assert first["steps"] == [5, 10]
    again = train(tmp_path, save_on_train_end=False)
    assert again["restored"] == 10
    assert again["trained"] == 2  # the steps after the last scheduled save, trained again
    assert again["fingerprint"] == first["fingerprint"]  # exactly
    assert again["steps"] == [5, 10]


def test_a_fit_that_raises_saves_nothing_more(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom after step 7"):
        train(tmp_path, raise_at=7)
    # the raising fit still holds the folder (Keras calls no callback on an exception; the
    # next fit's callback takes it over): read the committed step folders directly
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("step-*")) == [5]
    gc.collect()  # the raising fit's callback is garbage now; its open Checkpointer is not
    resumed = train(tmp_path)
    assert resumed["restored"] == 5
    assert resumed["steps"] == [5, 10, 12]
