"""Outside QA for issue 12 (framework integrations): regressions for bugs found by trying the
documented setups as a new user would. Each test is xfail(strict=True) until the bug is fixed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


# ---- Lightning: fit(ckpt_path=...) together with the callback ---------------------------------
def _lightning_fit(root, mc_dir, *, ckpt_path=None, max_epochs=2):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    import savegame as sg
    from savegame.integrations.lightning import SavegameCallback

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    cb = SavegameCallback(root, save=sg.Every(steps=2), keep=sg.Keep(last=10))
    mc = pl.callbacks.ModelCheckpoint(dirpath=mc_dir, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[cb, mc],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        M(),
        train_dataloaders=StatefulDataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
        val_dataloaders=DataLoader(TensorDataset(x, y), batch_size=16),
        ckpt_path=ckpt_path,
    )
    return cb, trainer


@pytest.mark.filterwarnings("ignore")
def test_lightning_explicit_ckpt_path_wins(tmp_path):
    """fit(ckpt_path=...) wins over the callback: it restores nothing (it restored savegame's
    newest checkpoint too and mixed it with the .ckpt: StepExistsError, or an epoch lost
    silently). Into a run folder that already holds savegame checkpoints the run from the
    .ckpt would have to overwrite them, so that is refused before training, naming the fix."""
    root, mc_dir = tmp_path / "run", tmp_path / "mc"
    _lightning_fit(root, mc_dir)  # 2 epochs x 4 steps: savegame has steps up to 8
    first = sorted(p.name for p in mc_dir.iterdir())
    assert first[0].startswith("epoch=0-step=4"), first
    ckpt = str(mc_dir / first[0])
    # a new run folder: the .ckpt wins, the run continues from step 4 and saves there
    cb, trainer = _lightning_fit(tmp_path / "fresh", tmp_path / "mc2", ckpt_path=ckpt)
    assert cb.restored_step is None
    assert trainer.global_step == 8  # resumed at step 4, trained the second epoch
    assert sorted(p.name for p in (tmp_path / "fresh").glob("step-*"))[-1] == "step-000000000008"
    # the folder that holds steps up to 8: refused, nothing restored or overwritten
    before = sorted(p.name for p in root.glob("step-*"))
    with pytest.raises(ValueError, match="already holds checkpoints .*new run folder"):
        _lightning_fit(root, tmp_path / "mc3", ckpt_path=ckpt)
    assert sorted(p.name for p in root.glob("step-*")) == before


# ---- Keras: fit() again in the same process after an exception inside fit ----------------------
@pytest.mark.filterwarnings("ignore")
def test_keras_refit_after_exception_same_callback(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras already imported on another backend")
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    import savegame as sg
    from savegame.integrations.keras import SavegameCheckpoint

    assert os.environ["KERAS_BACKEND"] == "torch"
    keras.utils.set_random_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long()
    loader = StatefulDataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Boom(keras.callbacks.Callback):
        armed = True

        def on_train_batch_end(self, batch, logs=None):
            if self.armed and int(self.model.optimizer.iterations.numpy()) == 7:
                self.armed = False
                raise RuntimeError("a bug in the user's callback")

    cb = SavegameCheckpoint(tmp_path / "run", loader=loader, save=sg.Every(steps=2), verbose=0)
    with pytest.raises(RuntimeError):
        model.fit(loader, epochs=3, callbacks=[cb, Boom()], verbose=0, shuffle=False)
    try:
        # the notebook user fixes the bug and runs the cell again: it should resume from step 6
        model.fit(loader, epochs=3, callbacks=[cb], verbose=0, shuffle=False)
        assert cb.restored_step == 6
    finally:
        if cb.checkpointer is not None:
            cb.checkpointer.close()
