"""Resuming with changes (issue 13, "Overrides on resume"): ``restore(only=/skip=/strict=)``,
the report on ``ckpt.last_restore``, and the new-learning-rate recipes of docs/resume.md."""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame as sg
from savegame.state.overrides import RestoreReport


def _net(*widths: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, model[0].in_features)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ckpt(root: Path) -> sg.Checkpointer:
    return sg.Checkpointer(root, handle_signals=False)


def _saved_run(root: Path, *widths: int) -> dict[str, Any]:
    """Train a little, save step 5, and return deep copies of what was saved."""
    torch.manual_seed(0)
    model = _net(*(widths or (3, 4, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt)
    sched.step()
    extras = {"epoch": 3, "best": 0.5}
    with _ckpt(root) as ckpt:
        ckpt.save(sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras), 5)
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "scheduler": copy.deepcopy(sched.state_dict()),
        "extras": dict(extras),
        "torch_rng": torch.get_rng_state(),
    }


def _fresh(*widths: int, seed: int = 1) -> tuple[Any, ...]:
    torch.manual_seed(seed)
    model = _net(*(widths or (3, 4, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    _train(model, opt, 1)  # live moments exist, so an in-place read into them would show
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    extras: dict[str, Any] = {"epoch": 0, "new": "live"}
    return model, opt, sched, extras


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _snapshot(*objs: Any) -> list[Any]:
    return [copy.deepcopy(o.state_dict() if hasattr(o, "state_dict") else dict(o)) for o in objs]


# ---- partial restore -------------------------------------------------------------------------
def test_only_model_restores_the_weights_and_leaves_everything_else_bitwise(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh()
    before = _snapshot(opt, sched, extras)
    torch.manual_seed(123)
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        assert ckpt.restore(state, only=["model"]) == 5
        report = ckpt.last_restore
    assert _same(model.state_dict(), saved["model"])
    assert _same(_snapshot(opt, sched, extras), before)
    assert torch.equal(torch.get_rng_state(), rng_before[0])  # the RNGs were not restored
    assert random.getstate() == rng_before[1]
    assert np.array_equal(np.random.get_state()[1], rng_before[2])
    assert isinstance(report, RestoreReport)
    assert report.step == 5 and report.restored == ("model",)
    assert report.skipped == ("optimizer", "scheduler", "extras", "rng")
    assert not report.complete


def test_skip_leaves_the_named_parts_bitwise_and_restores_the_rest(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh()
    model_before, opt_before = _snapshot(model, opt)
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        assert ckpt.restore(state, skip=["model", "optimizer"]) == 5
        assert ckpt.last_restore is not None
        assert ckpt.last_restore.skipped == ("model", "optimizer")
        assert ckpt.last_restore.restored == ("scheduler", "extras", "rng")
    # same shapes, so without the selection the reader would have read into them in place
    assert _same(_snapshot(model, opt), [model_before, opt_before])
    assert _same(sched.state_dict(), saved["scheduler"])
    assert extras == saved["extras"]  # a strict restore replaces the dict, as always
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])


def test_dict_entries_can_be_named(tmp_path: Path) -> None:
    _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh()
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        ckpt.restore(state, only=["extras/epoch"])
        assert extras == {"epoch": 3, "new": "live"}
        extras.update(best=9.0, epoch=0)
        ckpt.restore(state, skip=["extras/best"])
        assert extras == {"epoch": 3, "best": 9.0}  # the rest of extras replaced, best kept
        assert ckpt.last_restore is not None
        assert ckpt.last_restore.skipped == ("extras/best",)


def test_weights_only_fine_tune_keeps_the_new_optimizer(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path / "run")
    torch.manual_seed(5)
    model = _net(3, 4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)  # another optimizer
    with _ckpt(tmp_path / "ft") as ft, _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
        assert ckpt.restore(state, only=["model"]) == 5
        assert _same(model.state_dict(), saved["model"])
        assert opt.param_groups[0]["lr"] == 1e-4 and not opt.state
        _train(model, opt, 1)
        ft.save(state, 1)  # the fine-tune run saves and resumes normally
        assert ft.restore(state) == 1


# ---- non-strict restore ----------------------------------------------------------------------
def test_strict_surgery_still_fails_as_today(tmp_path: Path) -> None:
    _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh(3, 4, 4, 2)  # an added layer
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        with pytest.raises(sg.RestoreError, match="model.load_state_dict"):
            ckpt.restore(state)
        assert ckpt.last_restore is None


def test_added_layer_restores_what_matches_and_names_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh(3, 4, 4, 2)  # layer 2 is new, 4 is now 4 -> 2
    opt_before = _snapshot(opt)[0]
    new_layer = copy.deepcopy(model[2].state_dict())
    old_last = copy.deepcopy(model[4].state_dict())
    with caplog.at_level(logging.WARNING, logger="savegame"), _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        assert ckpt.restore(state, strict=False) == 5
        report = ckpt.last_restore
    assert report is not None
    # layer 0 matches; layer 2 (4 -> 2 in the checkpoint, 4 -> 4 now) has another weight shape
    assert torch.equal(model[0].weight, saved["model"]["0.weight"])
    assert torch.equal(model[2].bias, new_layer["bias"])
    assert set(report.mismatched) == {"model/2.weight", "model/2.bias", "optimizer"}
    assert "[2, 4] in the checkpoint, [4, 4] here" in report.mismatched["model/2.weight"]
    assert report.missing == ("model/4.weight", "model/4.bias", "extras/new")
    assert report.unexpected == ()
    assert _same(model[4].state_dict(), old_last) and _same(model[2].state_dict(), new_layer)
    assert _same(_snapshot(opt)[0], opt_before)  # another set of parameters: left alone
    assert "parameters" in report.mismatched["optimizer"]
    assert _same(sched.state_dict(), saved["scheduler"])
    assert extras == {**saved["extras"], "new": "live"}  # live-only entries are kept
    assert "model/2.weight" in caplog.text and "left parts as they were" in caplog.text


def test_removed_layer_restores_what_matches_and_names_the_rest(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path / "run", 3, 4, 4, 2)
    model, opt, sched, extras = _fresh(3, 4)
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        ckpt.restore(state, strict=False)
        report = ckpt.last_restore
    assert report is not None
    assert torch.equal(model[0].weight, saved["model"]["0.weight"])
    assert report.unexpected == ("model/2.weight", "model/2.bias", "model/4.weight", "model/4.bias")
    assert list(report.mismatched) == ["optimizer"]


def test_non_strict_objects_missing_and_unexpected(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path / "run")
    model, opt, _, _ = _fresh()
    ema = torch.nn.Linear(2, 2)
    ema_before = _snapshot(ema)[0]
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, ema=ema)  # no scheduler, no extras
        with pytest.raises(sg.RestoreError, match=r"missing \['ema'\].*unexpected"):
            ckpt.restore(state, skip=["rng"])
        assert ckpt.restore(state, strict=False) == 5
        report = ckpt.last_restore
        assert report is not None
        assert report.missing == ("ema",) and report.unexpected == ("scheduler", "extras")
        assert report.restored == ("model", "optimizer", "rng")
        assert not report.mismatched
        # skip= names the differences instead: a strict restore of the rest
        ckpt.restore(state, skip=["ema", "scheduler", "extras"])
        assert ckpt.last_restore.skipped == ("ema",)  # type: ignore[union-attr]
    assert _same(model.state_dict(), saved["model"])
    assert _same(opt.state_dict(), saved["optimizer"])
    assert _same(ema.state_dict(), ema_before)


def test_default_restore_reports_complete_and_fresh_run_none(tmp_path: Path) -> None:
    with _ckpt(tmp_path / "empty") as ckpt:
        model, opt, sched, extras = _fresh()
        assert ckpt.restore(sg.TrainState(model=model)) == 0
        assert ckpt.last_restore is None
    _saved_run(tmp_path / "run")
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        ckpt.restore(state)
        report = ckpt.last_restore
    assert report is not None and report.complete
    assert report.restored == ("model", "optimizer", "scheduler", "extras", "rng")
    assert report.path is not None and report.path.endswith("step-000000000005")


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"only": ["model"], "skip": ["rng"]}, ValueError, "not both"),
        ({"only": "model"}, TypeError, r"list of names, e.g. only=\['model'\]"),
        ({"skip": [3]}, TypeError, "must be str"),
        ({"only": []}, ValueError, "restores nothing"),
        ({"only": ["extras/"]}, ValueError, "entry of one of its dicts"),
        ({"strict": "no"}, TypeError, "True or False"),
        ({"only": ["modle"]}, sg.RestoreError, r"no 'modle'; it has \['model', 'extras', 'rng'\]"),
    ],
)
def test_bad_arguments_are_typed_errors_before_anything_is_read(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with _ckpt(tmp_path / "run") as ckpt:  # a fresh run: refused all the same
        with pytest.raises(error, match=match):
            ckpt.restore(sg.TrainState(model=torch.nn.Linear(2, 2), extras={}), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"only": ["ema"]}, r"only='ema': the checkpoint has no 'ema'"),
        ({"skip": ["nothing"]}, "neither in this TrainState nor in the checkpoint"),
        ({"only": ["extras/nope"]}, r"has no entry 'nope' \(it has \['best', 'epoch'\]\)"),
        ({"only": ["model/0.weight"]}, "only entries of a plain dict"),
        ({"skip": ["rng/torch"]}, "only entries of a plain dict"),
    ],
)
def test_names_that_do_not_exist_name_what_does(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh()
    before = _snapshot(model, opt, sched, extras)
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(
            model=model, optimizer=opt, scheduler=sched, extras=extras, ema=torch.nn.Linear(1, 1)
        )
        with pytest.raises(sg.RestoreError, match=match) as info:
            ckpt.restore(state, **kwargs)
    assert info.value.key is not None
    assert "the checkpoint" in str(info.value) and "'optimizer'" in str(info.value)
    assert _same(_snapshot(model, opt, sched, extras), before)


def test_incompatible_shapes_with_only_stay_an_error(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path / "run")
    model, opt, sched, extras = _fresh(3, 5, 2)
    with _ckpt(tmp_path / "run") as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
        with pytest.raises(sg.RestoreError, match="size mismatch"):
            ckpt.restore(state, only=["model"])
        ckpt.restore(state, only=["model"], strict=False)  # what fits: the last bias
        assert ckpt.last_restore is not None
        assert list(ckpt.last_restore.mismatched) == [
            "model/0.weight",
            "model/0.bias",
            "model/2.weight",
        ]
    assert torch.equal(model[2].bias, saved["model"]["2.bias"])


# ---- a new learning rate (docs/resume.md, "A new learning rate") -----------------------------
def _lrs(opt: torch.optim.Optimizer, sched: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


SCHEDULES = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_recipe_scale_the_schedule_keeps_its_position(tmp_path: Path, kind: str) -> None:
    """Recipe 1: the same schedule, at the step it was at, as if it had started at new_lr."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SCHEDULES[kind](opt)
    _lrs(opt, sched, 4)
    with _ckpt(tmp_path / kind) as ckpt:
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched)
        ckpt.save(state, 4)
        # the restarted program: built as before, then the recipe
        opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
        sched2 = SCHEDULES[kind](opt2)
        ckpt.restore(sg.TrainState(model=model, optimizer=opt2, scheduler=sched2))
    new_lr = 0.03
    factor = new_lr / sched2.base_lrs[0]
    sched2.base_lrs = [base * factor for base in sched2.base_lrs]
    for group in opt2.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor
    # what a run started at new_lr would have done from step 4 on
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=new_lr)
    ref = SCHEDULES[kind](ref_opt)
    _lrs(ref_opt, ref, 4)
    assert opt2.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert _lrs(opt2, sched2, 8) == pytest.approx(_lrs(ref_opt, ref, 8))


def test_recipe_new_schedule_from_a_new_lr_keeps_the_moments(tmp_path: Path) -> None:
    """Recipe 2: the checkpoint's scheduler skipped, a new one from new_lr; the optimizer's
    momentum comes back."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    _train(torch.nn.Sequential(model), opt, 3)
    sched.step()
    momentum = copy.deepcopy(opt.state_dict()["state"])
    with _ckpt(tmp_path / "run") as ckpt:
        ckpt.save(sg.TrainState(model=model, optimizer=opt, scheduler=sched), 3)
        opt2 = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)  # a new schedule
        state = sg.TrainState(model=model, optimizer=opt2, scheduler=sched2)
        ckpt.restore(state, skip=["scheduler"])
    assert opt2.param_groups[0]["lr"] == 0.1  # the optimizer's groups came from the checkpoint
    for group, base, lr in zip(
        opt2.param_groups, sched2.base_lrs, sched2.get_last_lr(), strict=True
    ):
        group["initial_lr"], group["lr"] = base, lr
    assert _same(opt2.state_dict()["state"], momentum)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.02, momentum=0.9)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)
    assert _lrs(opt2, sched2, 6) == pytest.approx(_lrs(ref_opt, ref, 6))


def test_recipe_fixed_new_lr_without_the_scheduler(tmp_path: Path) -> None:
    """Recipe 3: the scheduler left out of the state and skipped, a fixed rate set after."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _lrs(opt, sched, 2)
    with _ckpt(tmp_path / "run") as ckpt:
        ckpt.save(sg.TrainState(model=model, optimizer=opt, scheduler=sched), 2)
        opt2 = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        assert ckpt.restore(sg.TrainState(model=model, optimizer=opt2), skip=["scheduler"]) == 2
    assert opt2.param_groups[0]["lr"] == 0.025  # the checkpoint's, until set
    for group in opt2.param_groups:
        group["lr"] = 0.3
    opt2.step()
    assert opt2.param_groups[0]["lr"] == 0.3
