"""Training script of tests/integrations/test_outside_s17_lightning.py (outside review s17).

``python train.py JSON`` runs one fit as a user's script would (the callback resumes by itself)
and prints ``RESULT {...}``; the tests also import :func:`train` and run it in their own process.
``cfg["kill_at"]``: SIGKILL this process at the first ``on_train_batch_end`` whose
``trainer.global_step`` is at least that number."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg
from savegame.integrations import lightning as sgl

warnings.filterwarnings("ignore")

SAMPLES, BATCH = 40, 4  # 10 batches per epoch


def data(n: int = SAMPLES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1) + 0.1 * torch.randn(n, generator=g), torch.arange(n))


class Stream(IterableDataset):
    """A plain stream of records (no state_dict): the same fixed order on every pass."""

    def __init__(self, n: int = SAMPLES) -> None:
        self.ds = data(n)
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()

    def __iter__(self) -> Any:
        for i in self.order:
            yield self.ds[i]


def thash(obj: Any) -> str:
    """A hash of nested containers of tensors and plain values (bitwise for tensors)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        elif isinstance(o, np.ndarray):
            h.update(o.tobytes())
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()[:16]


class Net(pl.LightningModule):
    def __init__(self, cfg: dict[str, Any], trace: list[list[int]]) -> None:
        super().__init__()
        self.cfg = cfg
        self.trace = trace
        self.manual = cfg.get("mode") == "manual"
        if self.manual:
            self.automatic_optimization = False
            self.G = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
            self.D = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        else:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
            )
        self.val_log: list[list[float]] = []
        self.test_log: list[float] = []

    # --- data helpers ---
    @staticmethod
    def unpack(batch: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if isinstance(batch, dict):  # a CombinedLoader of two loaders
            return [batch[k] for k in sorted(batch) if batch[k] is not None]
        return [batch]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        parts = self.unpack(batch)
        self.trace.append([int(self.global_step)] + [int(i) for p in parts for i in p[2]])
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        dm = getattr(self.trainer, "datamodule", None)
        if isinstance(dm, DM):  # the datamodule's own state, changed as training goes
            dm.seen += int(x.size(0))
            dm.acc += x.mean(0)[:3]
        if not self.manual:
            x = x + 0.05 * torch.randn_like(x)
            loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y)
            self.log("train_loss", loss)
            return loss
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        z = torch.randn(x.size(0), 4)
        fake = self.G(z)
        self.toggle_optimizer(opt_d)
        real_logit, fake_logit = self.D(x), self.D(fake.detach())
        d_loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        self.clip_gradients(opt_d, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        g_logit = self.D(self.G(z))
        g_loss = bce(g_logit, torch.ones_like(g_logit))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        if (batch_idx + 1) % 3 == 0:
            sch_g.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})
        return None

    def _val_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        if self.manual:
            logit = self.D(x)
            return torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._val_loss(batch))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        v = self.trainer.callback_metrics.get("val_loss")
        self.val_log.append([int(self.global_step), float(v) if v is not None else float("nan")])
        if self.manual and v is not None and not self.trainer.validating:
            self.lr_schedulers()[1].step(v)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._val_loss(batch)
        self.test_log.append(float(loss))
        self.log("test_loss", loss)

    def configure_optimizers(self) -> Any:
        if self.manual:
            opt_g = torch.optim.Adam(self.G.parameters(), lr=1e-2, betas=(0.5, 0.9))
            opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-2, betas=(0.5, 0.9))
            sch_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.9)
            sch_d = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_d, patience=0, factor=0.5)
            return [opt_g, opt_d], [sch_g, {"scheduler": sch_d, "monitor": "val_loss"}]
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheds: list[dict[str, Any]] = [
            {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.95),
             "interval": "step", "frequency": self.cfg.get("step_freq", 3)},
        ]
        if self.cfg.get("plateau"):
            scheds.append({"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, patience=0, factor=0.5, threshold=0.5),
                "monitor": "val_loss", "interval": "step", "frequency": 2, "strict": False})
        return [opt], scheds


class DM(pl.LightningDataModule):
    """A datamodule with its own state: samples seen and a running tensor (updated by the model)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.seen = 0
        self.acc = torch.zeros(3)

    def train_dataloader(self) -> Any:
        a = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
        if self.cfg.get("loaders") == "combined":
            b = StatefulDataLoader(data(14, seed=3), batch_size=3, shuffle=True)
            return CombinedLoader({"a": a, "b": b}, mode=self.cfg.get("combined_mode", "max_size"))
        return a

    def val_dataloader(self) -> Any:
        return DataLoader(data(16, seed=2), batch_size=8)

    def test_dataloader(self) -> Any:
        return DataLoader(data(16, seed=4), batch_size=8)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "acc": self.acc.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.acc = state["acc"].clone()


class Counter(pl.Callback):
    """A user callback with state: batches seen and a running sum of the train loss."""

    def __init__(self) -> None:
        self.batches = 0
        self.total = torch.zeros(())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *a: Any) -> None:
        self.batches += 1
        if isinstance(outputs, dict) and "loss" in outputs:
            self.total = self.total + outputs["loss"].detach().float()

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "total": self.total.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        self.total = state["total"].clone()


class Kill(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def build(cfg: dict[str, Any], trace: list[list[int]]) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    model = Net(cfg, trace)
    keep = sg.Keep(**cfg["keep"]) if "keep" in cfg else sg.Keep(last=50)
    cb = sgl.SavegameCallback(cfg["root"], save=sg.Every(**cfg.get("save", {"steps": 3})),
                              keep=keep, async_save=cfg.get("async_save", False))
    callbacks: list[pl.Callback] = [] if cfg.get("no_savegame") else [cb]
    counter = Counter()
    if cfg.get("counter"):
        callbacks.append(counter)
    if cfg.get("swa"):
        callbacks.append(pl.callbacks.StochasticWeightAveraging(**cfg["swa"]))
    if cfg.get("early_stop"):
        callbacks.append(pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", **cfg["early_stop"]))
    if cfg.get("model_ckpt"):
        callbacks.append(pl.callbacks.ModelCheckpoint(**cfg["model_ckpt"]))
    if cfg.get("kill_at") is not None:
        callbacks.append(Kill(cfg["kill_at"]))
    trainer = pl.Trainer(
        max_epochs=cfg.get("max_epochs", 3),
        max_steps=cfg.get("max_steps", -1),
        val_check_interval=cfg.get("val_check_interval"),
        check_val_every_n_epoch=cfg.get("check_val_every_n_epoch", 1),
        limit_train_batches=cfg.get("limit_train_batches"),
        limit_val_batches=cfg.get("limit_val_batches"),
        num_sanity_val_steps=cfg.get("num_sanity_val_steps", 0),
        accumulate_grad_batches=cfg.get("accumulate", 1),
        precision=cfg.get("precision", "32-true"),
        gradient_clip_val=cfg.get("gradient_clip_val"),
        deterministic=cfg.get("deterministic", False),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=bool(cfg.get("model_ckpt")),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    return {"model": model, "cb": cb, "trainer": trainer, "counter": counter}


def loaders(cfg: dict[str, Any]) -> dict[str, Any]:
    """fit's data arguments."""
    if cfg.get("datamodule"):
        return {"datamodule": DM(cfg)}
    if cfg.get("loaders") == "iterable":
        train = StatefulDataLoader(Stream(), batch_size=BATCH)
    else:
        train = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    return {"train_dataloaders": train, "val_dataloaders": DataLoader(data(16, seed=2), batch_size=8)}


def summary(cfg: dict[str, Any], parts: dict[str, Any], trace: list[list[int]], dm: Any) -> dict[str, Any]:
    model, trainer, cb = parts["model"], parts["trainer"], parts["cb"]
    fl = trainer.fit_loop
    el = fl.epoch_loop
    out: dict[str, Any] = {
        "weights": thash(model.state_dict()),
        "optim": [thash(o.state_dict()) for o in trainer.optimizers],
        "lrs": [[g["lr"] for g in o.param_groups] for o in trainer.optimizers],
        "sched": [thash(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        "loops": {
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batches_total": el.batch_progress.total.completed,
            "epochs_total": fl.epoch_progress.total.completed,
            "val_batches_total": el.val_loop.batch_progress.total.completed,
            "batches_that_stepped": int(el._batches_that_stepped),
        },
        "callback_metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items())},
        "val_log": model.val_log,
        "trace": trace,
        "restored": cb.restored_step,
        "counter": [parts["counter"].batches, float(parts["counter"].total)],
        "should_stop": bool(trainer.should_stop),
    }
    for c in trainer.callbacks:
        if isinstance(c, pl.callbacks.EarlyStopping):
            out["early_stop"] = {k: (float(v) if torch.is_tensor(v) else v) for k, v in c.state_dict().items()}
        if isinstance(c, pl.callbacks.StochasticWeightAveraging):
            avg = getattr(c, "_average_model", None)
            st = c.state_dict()
            out["swa"] = {
                "n_averaged": st["n_averaged"],
                "avg": None if avg is None else thash(avg.state_dict()),
                "latest_update_epoch": st["latest_update_epoch"],
                "scheduler": thash(st["scheduler_state"]),
            }
    if dm is not None:
        out["dm"] = [dm.seen, thash(dm.acc)]
    with sg.Checkpointer(cfg["root"], handle_signals=False) as ck:
        infos = [c for c in ck.list() if c.valid and c.kind == "checkpoint"]
        out["steps"] = sorted(c.step for c in infos)
        out["saved_metrics"] = {c.step: dict(c.metrics) for c in infos}
    return out


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    trace: list[list[int]] = []
    parts = build(cfg, trace)
    data_args = loaders(cfg)
    kw = {"ckpt_path": cfg["ckpt_path"]} if cfg.get("ckpt_path") else {}
    parts["trainer"].fit(parts["model"], **data_args, **kw)
    out = summary(cfg, parts, trace, data_args.get("datamodule"))
    if cfg.get("after"):  # validate and test after fit
        t = parts["trainer"]
        out["validate"] = [{k: float(v) for k, v in d.items()} for d in t.validate(parts["model"], **_eval(data_args))]
        out["test"] = [{k: float(v) for k, v in d.items()} for d in t.test(parts["model"], **_eval(data_args, test=True))]
        with sg.Checkpointer(cfg["root"], handle_signals=False) as ck:
            out["steps_after_eval"] = sorted(c.step for c in ck.list() if c.valid and c.kind == "checkpoint")
    return out


def _eval(data_args: dict[str, Any], test: bool = False) -> dict[str, Any]:
    if "datamodule" in data_args:
        return {"datamodule": data_args["datamodule"]}
    return {"dataloaders": DataLoader(data(16, seed=4 if test else 2), batch_size=8)}


if __name__ == "__main__":
    result = train(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result, default=str))
