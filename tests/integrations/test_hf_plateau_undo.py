"""The Hugging Face callback saves an evaluation step's checkpoint with the plateau scheduler's
step the Trainer takes right after ``on_evaluate`` (taken on the live scheduler, then undone).
The undo must give back a tensor learning rate too, which the scheduler changes in place."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("transformers")

from savegame.integrations.transformers import _as_after_plateau_step  # noqa: E402


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_the_plateau_step_is_undone_whatever_the_lr_is(tensor_lr: bool) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.1) if tensor_lr else 0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    sched.step(1.0)
    trainer = types.SimpleNamespace(
        lr_scheduler=sched, args=types.SimpleNamespace(metric_for_best_model="loss")
    )
    state = dict(sched.state_dict())
    with _as_after_plateau_step(trainer, {"eval_loss": 2.0}):
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05)  # as the Trainer leaves it
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)
    assert sched.state_dict() == state
    sched.step(2.0)  # the Trainer's own step: the rate is cut once
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05)  # not 0.025
