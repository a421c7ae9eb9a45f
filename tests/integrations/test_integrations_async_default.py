"""Every integration saves asynchronously unless told ``async_save=False`` (issue 12;
docs/integrations.md, "Async by default"), under the same argument name everywhere.

The guarantees of the default path are tested where training runs: a signal's save committed
before exit 75 and a bitwise resume under DDP with the default (test_hf_torchrun_resume.py,
test_accelerate_torchrun_resume.py), and with ``async_save=True`` for Lightning and Keras
(test_lightning_integration.py, test_keras_integration.py). Here: the defaults themselves, the
opt-out, and that the checkpointer each integration opens gets them.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")


def _default(fn: object) -> object:
    return inspect.signature(fn).parameters["async_save"].default  # type: ignore[arg-type]


def test_lightning_callback_is_async_by_default(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from savegame.integrations.lightning import SavegameCallback

    assert _default(SavegameCallback) is True
    assert SavegameCallback(tmp_path).async_save is True
    assert SavegameCallback(tmp_path, async_save=False).async_save is False


def test_keras_callback_is_async_by_default(tmp_path: Path) -> None:
    if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover
        pytest.skip("Keras runs on another backend in this process")
    pytest.importorskip("keras")
    from savegame.integrations.keras import SavegameCheckpoint

    assert _default(SavegameCheckpoint) is True
    assert SavegameCheckpoint(tmp_path, verbose=0).async_save is True
    assert SavegameCheckpoint(tmp_path, async_save=False, verbose=0).async_save is False


def test_transformers_attach_and_callback_are_async_by_default(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from savegame.integrations import transformers as sgt

    assert _default(sgt.attach) is True
    assert _default(sgt.SavegameCallback) is True
    assert sgt.SavegameCallback(tmp_path).async_save is True


def test_accelerate_attach_opens_an_async_checkpointer_by_default(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from savegame.integrations import accelerate as sga

    assert _default(sga.attach) is True
    assert _default(sga.AccelerateCheckpointer) is True
    acc = Accelerator(cpu=True)
    with sga.attach(acc, tmp_path / "a", handle_signals=False) as ckpt:
        assert ckpt.checkpointer.async_save is True
    with sga.attach(acc, tmp_path / "b", async_save=False, handle_signals=False) as ckpt:
        assert ckpt.checkpointer.async_save is False
