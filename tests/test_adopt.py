"""Resume from what users have: the classic tutorial torch.save dict imports into a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import savegame as sg


def _tutorial_checkpoint(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    torch.save(
        {"epoch": 7, "state_dict": model.state_dict(), "best_accuracy": 0.875, "optimizer": opt.state_dict()},
        path,
    )
    return model, opt


def test_tutorial_checkpoint_adopts_into_a_run_and_resumes_there(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    ref_model, ref_opt = _tutorial_checkpoint(src)
    pytest.importorskip("savegame.interop.torch_pickle")

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    extras = {"epoch": 0, "best_acc": 0.0}
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    keep = sg.Keep(last=2, best=1, monitor="val_acc", mode="max")
    with sg.Checkpointer(tmp_path / "run", keep=keep, handle_signals=False) as ck:
        path = ck.adopt(
            src,
            state,
            step=700,
            mapping={"model": "state_dict", "optimizer": "optimizer", "extras/epoch": "epoch", "extras/best_acc": "best_accuracy"},
            metrics={"val_acc": "best_accuracy"},
        )
    assert path.name == "step-000000000700"
    assert extras == {"epoch": 7, "best_acc": 0.875}
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # a fresh process would now resume from the adopted step, optimizer moments included
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    extras2: dict[str, object] = {}
    with sg.Checkpointer(tmp_path / "run", keep=keep, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=model2, optimizer=opt2, extras=extras2)) == 700
        assert ck.list()[0].metrics == {"val_acc": 0.875}
    assert extras2 == {"epoch": 7, "best_acc": 0.875}
    ref_state = ref_opt.state_dict()["state"]
    for pid, s in opt2.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], ref_state[pid]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], ref_state[pid]["exp_avg_sq"])


def test_adopt_names_a_missing_source_path(tmp_path: Path) -> None:
    src = tmp_path / "c.pt"
    _tutorial_checkpoint(src)
    pytest.importorskip("savegame.interop.torch_pickle")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        with pytest.raises(sg.CheckpointNotFoundError, match="model_state"):
            ck.adopt(src, sg.TrainState(model=model), step=1, mapping={"model": "model_state"})
        assert ck.list() == []
