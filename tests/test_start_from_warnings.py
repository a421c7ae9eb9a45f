"""``Checkpointer(start_from=…)`` that gives nothing to restore says so: the job starts fresh,
never silently (a typo in the path, or a source whose only checkpoint is damaged)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import savegame as sg


def _state() -> sg.TrainState:
    return sg.TrainState(model=torch.nn.Linear(2, 2))


def test_a_start_from_path_with_no_checkpoint_warns_that_the_run_starts_fresh(
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").mkdir()
    with sg.Checkpointer(
        tmp_path / "run", start_from=tmp_path / "empty", handle_signals=False
    ) as ck:
        with pytest.warns(UserWarning, match="holds no checkpoint.*starts from step 0"):
            assert ck.restore(_state()) == 0
    with sg.Checkpointer(
        tmp_path / "run", start_from=tmp_path / "typo", handle_signals=False
    ) as ck:
        # named as the argument the user gave, not as "run folder" (this run's own folder)
        with pytest.raises(sg.CheckpointNotFoundError, match=r"start_from=.*typo does not exist"):
            ck.restore(_state())
    (tmp_path / "model.pt").write_bytes(b"not a run")
    with sg.Checkpointer(
        tmp_path / "run", start_from=tmp_path / "model.pt", handle_signals=False
    ) as ck:
        with pytest.raises(sg.CheckpointNotFoundError, match=r"model.pt is a file, not a run"):
            ck.restore(_state())


def test_no_warning_once_the_run_has_its_own_checkpoint(tmp_path: Path) -> None:
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(_state(), 3)
    with sg.Checkpointer(
        tmp_path / "run", start_from=tmp_path / "missing", handle_signals=False
    ) as ck:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ck.restore(_state()) == 3
