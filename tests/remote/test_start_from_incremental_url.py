"""``Checkpointer(run, start_from=<one checkpoint's URL>)`` with an incremental checkpoint on an
object store (docs/tiers.md: "or a step-… checkpoint"): the files it shares with earlier steps
live under the run, not under the checkpoint's own prefix, and must be found there — as
``sg.load`` and ``savegame verify`` of the same URL find them."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import savegame as sg
from savegame.format import layout


def _state(seed: int) -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, sg.TrainState(model=model, rng=False)


def test_start_from_an_incremental_checkpoint_url(s3_url: str, tmp_path: Path) -> None:
    model, state = _state(0)
    with sg.Checkpointer(s3_url, handle_signals=False, keep=sg.Keep(last=5)) as ckpt:
        ckpt.save(state, 2)
        with torch.no_grad():
            model[2].weight.add_(1.0)  # only the last layer changes: step 4 shares the rest
        ckpt.save(state, 4)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    step_url = f"{s3_url}/{layout.step_dir(4)}"
    assert sorted(sg.load(step_url)["model"]) == sorted(want)  # sg.load finds the shared bytes

    fresh, new_state = _state(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sg.CorruptCheckpointWarning)
        with sg.Checkpointer(
            tmp_path / "job2", start_from=step_url, handle_signals=False
        ) as job2:
            assert job2.restore(new_state) == 4
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
