"""Keras 3 ``steps_per_execution > 1`` with savegame (issue 12): refused, with the fix named, before
anything is trained or written.

Keras' torch backend itself refuses it at ``fit`` (before any callback runs); the callback also
refuses it in ``on_train_begin``, for a Keras that would allow it: one ``on_train_batch_end`` per
N batches would make the saved position (counted one batch per call) resume on the wrong batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover - another backend was chosen
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)
pytest.importorskip("keras")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402


def _model(steps_per_execution: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", steps_per_execution=steps_per_execution)
    return model


def _xy() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    return x, x.sum(1, keepdims=True)


def test_fit_with_steps_per_execution_is_refused_and_leaves_the_run_folder_usable(
    tmp_path: Path,
) -> None:
    x, y = _xy()
    cb = sgk.SavegameCheckpoint(tmp_path, save=sg.Every(steps=1), verbose=0)
    with pytest.raises(ValueError, match="steps_per_execution"):
        _model(4).fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    assert not list(tmp_path.glob("step-*"))  # nothing trained, nothing saved
    # the same folder and callback then work with steps_per_execution=1 (no lock left behind)
    _model(1).fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    assert sorted(p.name for p in tmp_path.glob("step-*"))[-1] == "step-000000000004"


def test_the_callback_refuses_it_itself_naming_the_fix(tmp_path: Path) -> None:
    """What a Keras that accepted steps_per_execution on torch would meet at on_train_begin."""
    model = _model(1)
    model.steps_per_execution = 3
    cb = sgk.SavegameCheckpoint(tmp_path, verbose=0)
    cb.set_model(model)
    with pytest.raises(ValueError, match=r"steps_per_execution=3.*steps_per_execution=1"):
        cb.on_train_begin()
    assert cb.checkpointer is None  # refused before the run folder was opened
