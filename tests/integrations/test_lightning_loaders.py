"""Lightning + savegame with several train loaders (issue 12): a dict of ``StatefulDataLoader``
(Lightning's ``CombinedLoader``), stopped mid-epoch — after the shorter loader has cycled — and
resumed, ends bitwise equal to the uninterrupted run, with the same samples of every loader at
every step. One plain ``DataLoader`` among them gets the ``ExactnessWarning`` naming the fix.

In-process (a SIGTERM: save at the step boundary, ``SystemExit(75)``, then a new ``fit``), so
no Lightning import per trial.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities import CombinedLoader  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import lightning as sgl  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
]

BATCH = 8
LONG, SHORT = 48, 24  # 6 and 3 batches: the short loader cycles twice per epoch (max_size_cycle)
EPOCHS = 3


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1) + 0.1 * torch.randn(n, generator=g), torch.arange(n))


class Net(pl.LightningModule):
    def __init__(self, trace: list[Any]) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)
        self.trace = trace

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = torch.zeros(())
        row: list[Any] = [int(self.global_step)]
        for name in sorted(batch):
            x, y, idx = batch[name]
            row.append([int(i) for i in idx])
            x = x + 0.05 * torch.randn_like(x)
            loss = loss + torch.nn.functional.mse_loss(getattr(self, name)(x).squeeze(-1), y)
        self.trace.append(row)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Stop(pl.Callback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def fingerprint(model: pl.LightningModule, trainer: pl.Trainer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().numpy().tobytes())
    for st in trainer.optimizers[0].state_dict()["state"].values():
        for k, v in sorted(st.items()):
            h.update(k.encode() + (v.numpy().tobytes() if torch.is_tensor(v) else repr(v).encode()))
    return h.hexdigest()


def train(root: Path, *, stop_at: int | None = None, mode: str | None = None,
          plain_b: bool = False) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trace: list[Any] = []
    model = Net(trace)
    kind_b = DataLoader if plain_b else StatefulDataLoader
    loaders: Any = {
        "a": StatefulDataLoader(data(LONG, 1), batch_size=BATCH, shuffle=True),
        "b": kind_b(data(SHORT, 2), batch_size=BATCH, shuffle=True),
    }
    if mode is not None:
        loaders = CombinedLoader(loaders, mode=mode)
    cb = sgl.SavegameCallback(root, save=sg.Every(steps=1000), keep=sg.Keep(last=1))
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, Stop(stop_at)],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loaders)
    return {"fp": fingerprint(model, trainer), "trace": trace, "restored": cb.restored_step,
            "steps": trainer.global_step}  # fmt: skip


# 5: epoch 0, batch 5 (the short loader restarted at batch 4); 10: epoch 1, batch 4
@pytest.mark.parametrize(
    ("mode", "stop_at"),
    [(None, 5), pytest.param(None, 10, marks=pytest.mark.slow), ("min_size", 4)],
    ids=["dict-max_size_cycle-5", "dict-max_size_cycle-10", "combined-min_size-4"],
)
def test_several_loaders_resume_mid_epoch_bitwise(
    tmp_path: Path, mode: str | None, stop_at: int
) -> None:
    reference = train(tmp_path / "ref", mode=mode)
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", stop_at=stop_at, mode=mode)
    assert stopped.value.code == 75
    resumed = train(tmp_path / "run", mode=mode)
    assert resumed["restored"] == stop_at
    assert resumed["steps"] == reference["steps"]
    assert resumed["trace"] == reference["trace"][stop_at:]  # both loaders' samples, each step
    assert resumed["fp"] == reference["fp"]


def test_a_plain_loader_among_several_warns_naming_the_fix(tmp_path: Path) -> None:
    with pytest.warns(sgl.ExactnessWarning, match=r"train loader 1 .*StatefulDataLoader"):
        train(tmp_path / "run", plain_b=True)
