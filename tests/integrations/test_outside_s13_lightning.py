"""Outside review (s13): the Lightning callback, async by default, in the call orders
docs/integrations.md allows — fit then validate/test/predict, fit twice in one process (same
callback), an exception or a KeyboardInterrupt inside training, a run folder whose path has
spaces and non-ASCII characters. Every committed checkpoint must verify, the run folder must be
free for the next fit, and a resume must be bitwise equal to the uninterrupted run.
A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations.lightning import SavegameCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class Net(pl.LightningModule):
    def __init__(self, fail_at: int | None = None, exc: type[BaseException] = RuntimeError):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
        )
        self.fail_at, self.exc = fail_at, exc
        self.seen: list[int] = []

    def training_step(self, batch: Any, i: int) -> Any:
        x, y, idx = batch
        if self.fail_at is not None and self.trainer.global_step == self.fail_at:
            raise self.exc("boom inside training_step")
        self.seen.extend(int(v) for v in idx)
        return torch.nn.functional.cross_entropy(self.net(x + 0.01 * torch.randn_like(x)), y)

    def validation_step(self, batch: Any, i: int) -> None:
        x, y, _ = batch
        if self.fail_at is not None and -self.trainer.global_step == self.fail_at:
            raise self.exc("boom inside validation_step")
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch: Any, i: int) -> None:
        x, y, _ = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def predict_step(self, batch: Any, i: int) -> Any:
        return self.net(batch[0])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), torch.arange(40))


def _fingerprint(model: pl.LightningModule, trainer: pl.Trainer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(
            k.encode() + v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        )
    for s in trainer.optimizers[0].state_dict()["state"].values():
        for _k, v in sorted(s.items()):
            h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr(trainer.optimizers[0].param_groups[0]["lr"]).encode())
    return h.hexdigest()


def _trainer(cb: SavegameCallback | None, max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[cb] if cb is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
    )


def _fit(
    root: Path | None,
    max_epochs: int = 3,
    *,
    model: Net | None = None,
    cb: SavegameCallback | None = None,
    loader: StatefulDataLoader | None = None,
    fail_at: int | None = None,
    exc: type[BaseException] = RuntimeError,
    seed: bool = True,
) -> tuple[Net, pl.Trainer, SavegameCallback | None]:
    if seed:
        torch.manual_seed(0)
    model = model if model is not None else Net(fail_at, exc)
    if cb is None and root is not None:
        cb = SavegameCallback(root, save=sg.Every(steps=2), keep=sg.Keep(last=20))
    trainer = _trainer(cb, max_epochs)
    trainer.fit(
        model,
        train_dataloaders=loader or StatefulDataLoader(_data(), batch_size=8, shuffle=True),
        val_dataloaders=DataLoader(_data(), batch_size=20),
    )
    return model, trainer, cb


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three epochs (15 steps) with the callback (async, the default) on a fresh folder,
    never interrupted."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ref") / "run"
    model, trainer, _ = _fit(root)
    assert trainer.global_step == 15
    assert _steps(root) == [2, 4, 6, 8, 10, 12, 14, 15]  # scheduled saves + the end of fit
    return _fingerprint(model, trainer)


def _verify(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _free(root: Path) -> None:
    """No lock left behind: another writer can open the folder at once."""
    sg.Checkpointer(root, handle_signals=False).close()


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*"))


def test_uninterrupted_run_with_the_callback_is_deterministic(
    reference: str, tmp_path: Path
) -> None:
    model, trainer, _ = _fit(tmp_path / "run")
    assert _fingerprint(model, trainer) == reference
    _verify(tmp_path / "run")


def test_fit_then_validate_test_predict_save_nothing_and_leave_the_run_free(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    model, trainer, _ = _fit(root, max_epochs=1)
    before = _steps(root)
    val = DataLoader(_data(), batch_size=20)
    trainer.validate(model, val)
    trainer.test(model, val)
    preds = trainer.predict(model, val)
    assert len(preds) == 2
    assert _steps(root) == before == [2, 4, 5]
    _verify(root)
    _free(root)


def test_fit_again_with_the_same_callback_continues_bitwise(reference: str, tmp_path: Path) -> None:
    """A notebook: fit 1 epoch, then a new Trainer with max_epochs=3 and the same callback,
    model and loader objects: it resumes at step 5 (the end of the first fit) and ends where an uninterrupted run ends."""
    root = tmp_path / "run"
    torch.manual_seed(0)  # as _fit does: the model, then the loader (it draws its seed when built)
    model = Net()
    loader = StatefulDataLoader(_data(), batch_size=8, shuffle=True)
    model, _, cb = _fit(root, max_epochs=1, model=model, loader=loader, seed=False)
    model2, trainer2, cb2 = _fit(root, max_epochs=3, model=model, cb=cb, loader=loader)
    assert cb2 is cb and cb.restored_step == 5
    assert trainer2.global_step == 15
    assert _fingerprint(model2, trainer2) == reference
    _verify(root)
    _free(root)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_inside_training_leaves_committed_steps_then_resume_is_bitwise(
    reference: str, tmp_path: Path, exc: type[BaseException]
) -> None:
    """training_step raises at step 7 (mid-epoch 2, the async save of step 6 maybe still in
    flight). Lightning turns a KeyboardInterrupt into SystemExit(1)."""
    root = tmp_path / "run"
    torch.manual_seed(0)
    expected = SystemExit if exc is KeyboardInterrupt else exc
    import signal

    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(expected):
            _fit(root, fail_at=7, exc=exc)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
    assert _steps(root) == [2, 4, 6]  # 6 was in flight: committed, not lost
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp", "tmp"))]
    _verify(root)
    _free(root)
    model, trainer, cb = _fit(root)  # the script run again
    assert cb is not None and cb.restored_step == 6
    assert _fingerprint(model, trainer) == reference
    _verify(root)


@pytest.mark.parametrize(
    "name", [pytest.param("run with spaces", marks=pytest.mark.slow), "运行 ünïcode ✓"]
)  # CI runs the second (it has a space too)
def test_a_run_folder_with_spaces_and_unicode_saves_resumes_and_verifies(
    reference: str, tmp_path: Path, name: str
) -> None:
    root = tmp_path / name / "exp 1"
    with pytest.raises(RuntimeError):
        _fit(root, fail_at=9)
    model, trainer, cb = _fit(root)
    assert cb is not None and cb.restored_step == 8
    assert _fingerprint(model, trainer) == reference
    _verify(root)
    out = subprocess.run(
        [sys.executable, "-m", "savegame", "ls", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "│   14 │" in out.stdout, out.stdout + out.stderr


def test_a_finished_run_fit_again_trains_nothing_and_saves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _fit(root)
    before = sorted(p.name for p in root.iterdir())
    model, trainer, cb = _fit(root)
    assert cb is not None and cb.restored_step == 15 and trainer.global_step == 15
    assert sorted(p.name for p in root.iterdir() if p.name != ".lock") == [
        n for n in before if n != ".lock"
    ]
    _verify(root)


def test_the_same_trainer_fit_twice_is_not_an_error(tmp_path: Path) -> None:
    """Lightning allows fit() again on the same Trainer (it trains nothing more when
    max_epochs is reached); the callback must reopen its folder without a LockedError."""
    root = tmp_path / "run"
    model, trainer, cb = _fit(root, max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            model,
            StatefulDataLoader(_data(), batch_size=8, shuffle=True),
            DataLoader(_data(), batch_size=20),
        )
    assert trainer.global_step == 10
    _verify(root)
    _free(root)


_CTRL_C = """
import os, signal, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
import test_outside_s13_lightning as t

class CtrlC(t.Net):
    def training_step(self, batch, i):
        if self.trainer.global_step == 7 and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C mid-step (mid-epoch 2)
        return super().training_step(batch, i)

torch.manual_seed(0)
model, trainer, cb = t._fit(t.Path(sys.argv[1]), model=CtrlC(), seed=False)
print("FINISHED", trainer.global_step, cb.restored_step, t._fingerprint(model, trainer))
"""


@pytest.mark.slow  # CI under 20 minutes
def test_ctrl_c_mid_epoch_saves_at_the_step_boundary_exits_75_and_resumes_bitwise(
    reference: str, tmp_path: Path
) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C.format(here=str(Path(__file__).parent)))
    root = tmp_path / "run"
    first = subprocess.run(
        [sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=180
    )
    assert first.returncode == 75, first.stderr[-3000:]
    assert "FINISHED" not in first.stdout
    assert _steps(root)[-1] == 8  # the step the signal arrived in, completed and saved
    _verify(root)
    second = subprocess.run(
        [sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=180
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"FINISHED 15 8 {reference}" in second.stdout, second.stdout


def test_an_exception_inside_validation_then_resume_is_bitwise(
    reference: str, tmp_path: Path
) -> None:
    """validation_step raises in the validation after step 10 (whose save waits for that
    validation's end, docs/integrations.md "When it saves"): the run resumes from step 8."""
    root = tmp_path / "run"
    with pytest.raises(RuntimeError, match="validation_step"):
        _fit(root, fail_at=-10)
    assert _steps(root) == [2, 4, 6, 8]
    _verify(root)
    _free(root)
    model, trainer, cb = _fit(root)
    assert cb is not None and cb.restored_step == 8
    assert _fingerprint(model, trainer) == reference
