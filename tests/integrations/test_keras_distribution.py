"""Keras 3 on several devices with savegame (issue 12): what Keras' torch backend offers, and the
callback's refusal of what it cannot save and resume exactly.

Keras 3's distribution API (``keras.distribution``: ``DataParallel``, ``ModelParallel``,
``DeviceMesh``) has a backend only for JAX. On torch, ``keras.src.backend.distribution_lib``
is None: ``list_devices()`` fails, and ``set_distribution(...)`` is accepted but ``fit`` ignores
it and trains on one device. Several processes (torchrun) would each train their own model (no
gradient exchange). The callback refuses both in ``on_train_begin``, before anything is trained
or written, with ``UnsupportedSetupError`` (a ``ValueError``) naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover - another backend was chosen
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)
pytest.importorskip("keras")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import distribution as kd  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402


def _fit(root: Path) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    cb = sgk.SavegameCheckpoint(root, save=sg.Every(steps=1), verbose=0)
    return model.fit(x, x.sum(1, keepdims=True), epochs=1, batch_size=4, callbacks=[cb], verbose=0)


@pytest.fixture
def data_parallel() -> Any:
    mesh = kd.DeviceMesh(shape=(1,), axis_names=["batch"], devices=["cpu:0"])
    kd.set_distribution(kd.DataParallel(device_mesh=mesh))
    try:
        yield
    finally:
        kd.set_distribution(None)


def test_keras_torch_backend_has_no_distribution_backend() -> None:
    """The premise of docs/integrations.md: if a Keras release adds one, this fails and the
    docs and the refusal must be revisited."""
    from keras.src import backend

    assert backend.backend() == "torch"
    assert backend.distribution_lib is None
    with pytest.raises(AttributeError):
        kd.list_devices()


def test_a_keras_distribution_is_refused_naming_the_fix(
    tmp_path: Path, data_parallel: None
) -> None:
    root = tmp_path / "run"
    with pytest.raises(
        sgk.UnsupportedSetupError, match=r"DataParallel.*no distribution support.*Remove"
    ):
        _fit(root)
    assert not root.exists()  # nothing written
    kd.set_distribution(None)
    _fit(root)  # the same folder works once the distribution is gone
    assert (root / "step-000000000004").is_dir()


def test_several_processes_are_refused_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one of 2 \(torchrun.*DistributedDataParallel"):
        _fit(tmp_path / "run")
    assert not (tmp_path / "run").exists()
