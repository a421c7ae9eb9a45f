"""A ``torch.compile``d model (``OptimizedModule``) is saved and restored through the module it
compiles, as Lightning and Accelerate save it: checkpoint keys carry no ``_orig_mod.``, and a
checkpoint restores into the compiled or the plain model alike (docs/resume.md). Checkpoints
saved with the prefix by an earlier savegame still restore. ``torch.compile`` builds its wrapper
lazily: nothing here runs the compiled forward (no C++ compiler needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import savegame as sg


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        m[1].running_mean.add_(seed)
    return m


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("saved_compiled", [True, False], ids=["from-compiled", "from-plain"])
@pytest.mark.parametrize("into_compiled", [True, False], ids=["into-compiled", "into-plain"])
def test_compiled_and_plain_models_restore_into_each_other(
    tmp_path: Path, saved_compiled: bool, into_compiled: bool
) -> None:
    src = _model(0)
    opt = torch.optim.Adam(src.parameters(), lr=0.1)
    src(torch.randn(5, 3)).sum().backward()
    opt.step()
    model = torch.compile(src) if saved_compiled else src
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model, optimizer=opt), 1)
    assert not any("_orig_mod" in k for k in sg.open(tmp_path / "run" / "step-000000000001").keys())

    dst = _model(1)
    dst_opt = torch.optim.Adam(dst.parameters(), lr=0.1)
    target = torch.compile(dst) if into_compiled else dst
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=target, optimizer=dst_opt)) == 1
    assert _same(dst, src)
    got, want = dst_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]) for i in want)


@pytest.mark.parametrize("attr", ["_orig_mod", "module"])
def test_a_checkpoint_saved_with_wrapper_keys_still_restores(tmp_path: Path, attr: str) -> None:
    """An earlier savegame saved a compiled model's keys as they were (``_orig_mod.0.weight``),
    and a one-rank DDP run's with ``module.``: both restore into the plain or compiled model."""

    class Saved(torch.nn.Module):  # the key layout OptimizedModule's / DDP's state_dict() gives
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, attr, inner)

    src = _model(0)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=Saved(src)), 1)
    for compiled in (False, True):
        dst = _model(1)
        with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
            ck.restore(sg.TrainState(model=torch.compile(dst) if compiled else dst))
        assert _same(dst, src)


def test_a_compiled_model_that_does_not_fit_is_refused_untouched(tmp_path: Path) -> None:
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=torch.compile(_model(0))), 1)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        with pytest.raises(sg.RestoreError, match="model.load_state_dict") as exc:
            ck.restore(sg.TrainState(model=torch.compile(other)))
    assert exc.value.key == "model" and "_orig_mod" not in str(exc.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    # strict=False loads what fits into the compiled model's module, and reports the rest
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.restore(sg.TrainState(model=torch.compile(other)), strict=False)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert ck.last_restore is not None and ck.last_restore.mismatched
