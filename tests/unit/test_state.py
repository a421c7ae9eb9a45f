from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from savegame import errors
from savegame import state as statelib
from savegame.state import TrainState


def test_plain_dataloader_gets_the_stateful_dataloader_hint() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4)), batch_size=2)
    with pytest.raises(TypeError, match="StatefulDataLoader"):
        TrainState(loader=loader)


def test_non_stateful_object_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"TrainState\(thing=...\).*int"):
        TrainState(thing=3)  # type: ignore[arg-type]


def test_rng_name_is_reserved() -> None:
    with pytest.raises(TypeError, match="reserved"):
        TrainState(rng={})  # type: ignore[arg-type]


def test_capture_includes_objects_extras_and_rng() -> None:
    model = torch.nn.Linear(2, 2)
    extras = {"epoch": 3}
    tree = statelib.capture(TrainState(model=model, extras=extras))
    assert set(tree) == {"model", "extras", "rng"}
    assert tree["extras"] == {"epoch": 3} and tree["extras"] is not extras
    assert set(statelib.capture(TrainState(rng=False, model=model))) == {"model"}


def test_apply_restores_objects_and_updates_extras_in_place() -> None:
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    extras: dict[str, Any] = {"epoch": 0, "stale": 1}
    tree = statelib.capture(TrainState(model=src, extras={"epoch": 7}))
    statelib.apply(TrainState(model=dst, extras=extras), tree)
    assert torch.equal(dst.weight, src.weight)
    assert extras == {"epoch": 7}


def test_apply_with_different_object_names_is_restore_error_and_changes_nothing() -> None:
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = dst.weight.detach().clone()
    tree = statelib.capture(TrainState(model=src, extras={}))
    with pytest.raises(
        errors.RestoreError, match=r"missing \['net'\].*unexpected \['model'\]"
    ) as info:
        statelib.apply(TrainState(net=dst, extras={}), tree, where="ckpt-7")
    assert info.value.path == "ckpt-7"
    assert torch.equal(dst.weight, before)


def test_apply_translates_load_state_dict_failure_to_restore_error() -> None:
    tree = statelib.capture(TrainState(model=torch.nn.Linear(2, 2)))
    with pytest.raises(errors.RestoreError, match="model.load_state_dict") as info:
        statelib.apply(TrainState(model=torch.nn.Linear(3, 3)), tree)
    assert info.value.key == "model"
    assert isinstance(info.value.__cause__, RuntimeError)
