"""Keras callbacks have no exception hook: a ``fit`` that raised leaves its Checkpointer, and the
run folder's lock, open. The next ``fit`` in the same thread (the same callback, or a new one:
the notebook cell run again) closes what that fit left and resumes — its async save in flight
is committed by that close. A ``fit`` still running on another thread keeps its lock: a second
``fit`` on the same folder gets ``LockedError``, as two writers always do."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)
keras = pytest.importorskip("keras")

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402

from ._run_folders import steps as _steps  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _build() -> tuple[Any, StatefulDataLoader]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    return model, StatefulDataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _cb(root: Path, loader: StatefulDataLoader) -> sgk.SavegameCheckpoint:
    return sgk.SavegameCheckpoint(
        root, loader=loader, save=sg.Every(steps=2), keep=sg.Keep(last=20), verbose=0
    )


class Boom(keras.callbacks.Callback):
    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if sgk._iterations(self.model) == 5:
            raise RuntimeError("boom inside fit")


def test_a_new_callback_after_an_exception_in_fit_takes_the_folder_over(tmp_path: Path) -> None:
    root = tmp_path / "run"
    model, loader = _build()
    old = _cb(root, loader)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(loader, epochs=2, callbacks=[old, Boom()], verbose=0)
    assert old.checkpointer is not None  # left open: Keras never called on_train_end
    model, loader = _build()
    new = _cb(root, loader)
    model.fit(loader, epochs=2, callbacks=[new], verbose=0)
    assert new.restored_step == 4  # the async save of step 4 was committed, then resumed
    assert old.checkpointer is None and new.checkpointer is None
    assert _steps(root)[-1] == 12
    sg.Checkpointer(root, handle_signals=False).close()  # nothing holds the folder now


def test_a_fit_running_on_another_thread_keeps_its_lock(tmp_path: Path) -> None:
    root = tmp_path / "run"
    inside, release = threading.Event(), threading.Event()

    class Hold(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if sgk._iterations(self.model) == 3:
                inside.set()
                release.wait(60)

    model, loader = _build()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.fit(loader, epochs=1, callbacks=[_cb(root, loader), Hold()], verbose=0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert inside.wait(60)
        model2, loader2 = _build()
        with pytest.raises(sg.LockedError):
            model2.fit(loader2, epochs=1, callbacks=[_cb(root, loader2)], verbose=0)
    finally:
        release.set()
        worker.join(60)
    assert not errors
    assert _steps(root)[-1] == 6  # the first fit went on to its end and saved
