"""Lightning: ``SavegameCallback(save_on_train_end=True)`` saves the end of ``fit``.

A run whose ``max_steps``/``max_epochs`` falls between two scheduled saves used to leave its
last steps unsaved: the job requeued after it finished restored the last scheduled save and
trained those steps again (exactly, but for nothing). Now the end of a normal ``fit`` is saved
(unless that step is saved already), so the requeued job restores the end and trains nothing;
a job resumed with a larger limit continues from it bitwise equal to an uninterrupted run to
that limit (mid-epoch too: the final save carries the loop's and the loader's position at the
last step). A ``fit`` that raises saves nothing more than its schedule did. Under DDP (2 gloo
ranks) every rank takes part in the final save.

Saves at on_train_epoch_end (``Every(epochs=N)``) carry the loop state of the step's batch or
validation end too: Lightning restored as it is at that hook runs one epoch less.

This file is also the launcher of its DDP job (``python THIS_FILE BASE OUT``), as
test_lightning_ddp.py is of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import lightning as sgl  # noqa: E402

SAMPLES, BATCH = 48, 8  # 6 steps per epoch
HERE = Path(__file__).resolve()

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
]


class Net(pl.LightningModule):
    def __init__(self, trace: list[list[int]], raise_at: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        self.trace = trace
        self.raise_at = raise_at
        self.validations = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        if self.raise_at is not None and self.global_step + 1 == self.raise_at:
            raise RuntimeError(f"boom in step {self.raise_at}")
        self.trace.append([int(self.global_step)] + [int(i) for i in idx])
        x = x + 0.05 * torch.randn_like(x)  # random augmentation from the global RNG
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def on_validation_end(self) -> None:
        self.validations += 1

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Stop(pl.Callback):
    """Sets ``trainer.should_stop`` after step ``at``, in its own on_train_batch_end (after
    savegame's when listed after it, as Trainer(max_time=)'s timer is)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            trainer.should_stop = True


def data(n: int = SAMPLES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1) + 0.1 * torch.randn(n, generator=g), torch.arange(n))


def fingerprint(model: pl.LightningModule, trainer: pl.Trainer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    opt = trainer.optimizers[0]
    for group in opt.state_dict()["state"].values():
        for k, v in sorted(group.items()):
            h.update(k.encode())
            h.update(
                v.detach().contiguous().numpy().tobytes()
                if torch.is_tensor(v)
                else repr(v).encode()
            )
    h.update(repr(opt.param_groups[0]["lr"]).encode())
    return h.hexdigest()


def valid_steps(root: Path) -> list[int]:
    with sg.Checkpointer(root, handle_signals=False) as ck:
        return sorted(c.step for c in ck.list() if c.valid)


def train(
    root: Path,
    *,
    max_steps: int = -1,
    max_epochs: int | None = None,
    every: int = 4,
    save: sg.Every | None = None,
    save_on_train_end: bool = True,
    raise_at: int | None = None,
    stop_after_savegame: int | None = None,
    async_save: bool = False,
) -> dict[str, Any]:
    """One fit (fresh or resumed by the callback)."""
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    trace: list[list[int]] = []
    model = Net(trace, raise_at)
    loader = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    val = DataLoader(data(16, seed=2), batch_size=16)
    cb = sgl.SavegameCallback(
        root,
        save=save or sg.Every(steps=every),
        keep=sg.Keep(last=10),
        async_save=async_save,
        save_on_train_end=save_on_train_end,
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs if max_epochs is not None else (-1 if max_steps > 0 else 1),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb] if stop_after_savegame is None else [cb, Stop(stop_after_savegame)],
    )
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val)
    return {
        "fingerprint": fingerprint(model, trainer),
        "trace": trace,
        "restored": cb.restored_step,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "validations": model.validations,
        "steps": valid_steps(root),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """The uninterrupted run to a limit ("max_steps=15", "max_epochs=3"), trained on first use."""
    base = tmp_path_factory.mktemp("lightning-final-ref")
    cache: dict[str, dict[str, Any]] = {}

    def get(key: str) -> dict[str, Any]:
        if key not in cache:
            kind, limit = key.split("=")
            if kind == "max_steps":
                cache[key] = train(base / key, max_steps=int(limit))
            else:
                cache[key] = train(base / key, max_epochs=int(limit))
        return cache[key]

    return get


@pytest.mark.parametrize(
    ("limit", "every", "end", "scheduled"),
    [
        ({"max_steps": 9}, 4, 9, [4, 8]),  # ends mid-epoch (epoch 1, batch 3)
        ({"max_epochs": 2}, 5, 12, [5, 10]),  # ends at an epoch's end
    ],
    ids=["max_steps-mid-epoch", "max_epochs"],
)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_finished_run_saves_its_end_and_requeued_trains_nothing(
    tmp_path: Path,
    limit: dict[str, int],
    every: int,
    end: int,
    scheduled: list[int],
    async_save: bool,
) -> None:
    first = train(tmp_path, every=every, async_save=async_save, **limit)  # type: ignore[arg-type]
    assert first["global_step"] == end
    assert first["steps"] == [*scheduled, end]  # the schedule's saves, and the end of fit
    again = train(tmp_path, every=every, async_save=async_save, **limit)  # type: ignore[arg-type]
    assert again["restored"] == end
    assert again["trace"] == []  # no training step ...
    assert again["validations"] == 0  # ... and no validation
    assert again["global_step"] == end
    assert again["fingerprint"] == first["fingerprint"]
    assert again["steps"] == [*scheduled, end]  # and nothing saved again


@pytest.mark.parametrize(
    ("first", "then", "ref"),
    [
        ({"max_steps": 9}, {"max_steps": 15}, "max_steps=15"),
        ({"max_steps": 9}, {"max_epochs": 3}, "max_epochs=3"),
        ({"max_epochs": 2}, {"max_epochs": 3}, "max_epochs=3"),
    ],
    ids=["steps-9-then-15", "steps-9-then-3-epochs", "epochs-2-then-3"],
)
def test_a_larger_limit_continues_from_the_final_save_bitwise(
    reference: Callable[[str], dict[str, Any]],
    tmp_path: Path,
    first: dict[str, int],
    then: dict[str, int],
    ref: str,
) -> None:
    """The final save of a fit stopped by max_steps mid-epoch holds the loop and loader
    position of that step: the continued run trains the rest of that epoch, counts epochs as
    the uninterrupted run does, and ends equal to it."""
    done = train(tmp_path, every=5, **first)  # type: ignore[arg-type]
    more = train(tmp_path, every=5, **then)  # type: ignore[arg-type]
    uninterrupted = reference(ref)
    assert more["restored"] == done["global_step"]
    assert more["global_step"] == uninterrupted["global_step"]
    assert more["epoch"] == uninterrupted["epoch"]
    assert more["trace"] == uninterrupted["trace"][done["global_step"] :]
    assert more["fingerprint"] == uninterrupted["fingerprint"]


def test_save_on_train_end_false_keeps_the_old_behaviour(tmp_path: Path) -> None:
    first = train(tmp_path, max_steps=9, save_on_train_end=False)
    assert first["steps"] == [4, 8]
    again = train(tmp_path, max_steps=9, save_on_train_end=False)
    assert again["restored"] == 8
    assert len(again["trace"]) == 1  # step 9 trained again ...
    assert again["fingerprint"] == first["fingerprint"]  # ... exactly
    assert again["steps"] == [4, 8]


def test_a_fit_that_raises_saves_nothing_more(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom in step 7"):
        train(tmp_path, max_steps=9, raise_at=7)
    assert valid_steps(tmp_path) == [4]
    resumed = train(tmp_path, max_steps=9)
    assert resumed["restored"] == 4
    assert resumed["steps"] == [4, 8, 9]


def test_should_stop_set_after_savegames_hook_mid_epoch_saves_no_final(
    reference: Callable[[str], dict[str, Any]], tmp_path: Path
) -> None:
    """A stop decided after the callback's hook of the step (max_time's timer runs last) leaves
    no loop state of that step to save: no final save, rather than one that makes the epoch
    look complete (a job run on from it would train one epoch less). The job run again resumes
    from the last scheduled save and ends equal to the uninterrupted run."""
    stopped = train(tmp_path, max_epochs=3, every=5, stop_after_savegame=9)
    assert stopped["global_step"] == 9
    assert stopped["steps"] == [5]
    more = train(tmp_path, max_epochs=3, every=5)
    uninterrupted = reference("max_epochs=3")
    assert more["restored"] == 5
    assert more["trace"] == uninterrupted["trace"][5:]
    assert more["fingerprint"] == uninterrupted["fingerprint"]


# ---- DDP: 2 gloo ranks on CPU, launched as torchrun launches them ------------------------------
WORLD = 2
DDP_BATCH = 4  # 24 samples per rank: 6 steps per epoch
LAUNCH_TIMEOUT_S = 240


def ddp_fit(root: Path, max_steps: int, rank: int) -> dict[str, Any]:
    """One fit of one rank (fresh or resumed by the callback)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trace: list[list[int]] = []
    model = Net(trace)
    ds = data()
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    loader = StatefulDataLoader(ds, batch_size=DDP_BATCH, sampler=sampler)
    cb = sgl.SavegameCallback(root, save=sg.Every(steps=4), keep=sg.Keep(last=10))
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=DataLoader(data(16, 2), 8))
    return {
        "fingerprint": fingerprint(model, trainer),
        "trace": trace,
        "restored": cb.restored_step,
        "global_step": trainer.global_step,
    }


def rank_main(base: Path, out: Path, rank: int) -> None:
    """One rank: the uninterrupted run to 9 steps; then, in another folder, a run to 5 steps
    (mid-epoch: saved at 4 by the schedule, at 5 by the end of fit), the same job requeued
    (trains nothing), and a run to 9 steps from there. One process runs the four fits (one
    Lightning import, one process group)."""
    results = {
        "reference": ddp_fit(base / "ref", 9, rank),
        "first": ddp_fit(base / "run", 5, rank),
        "requeued": ddp_fit(base / "run", 5, rank),
        "more": ddp_fit(base / "run", 9, rank),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_main(argv: list[str]) -> None:
    """Fork the ranks; print their exit statuses. A rank that dies takes the job down."""
    base, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        GLOO_SOCKET_IFNAME="lo",
        SAVEGAME_DIST_TIMEOUT_S="90",
    )
    pids: dict[int, int] = {}
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a rank
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
            code = 0
            try:
                rank_main(base, out, rank)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids[pid] = rank
    codes: dict[int, int] = {}
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S - 10
    while len(codes) < WORLD:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                for other, r in pids.items():
                    if r not in codes:
                        os.kill(other, signal.SIGKILL)
                print("LAUNCH-TIMEOUT", flush=True)
            time.sleep(0.05)
            continue
        rank = pids[pid]
        codes[rank] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if codes[rank] != 0:
            for other, r in pids.items():
                if r not in codes:
                    os.kill(other, signal.SIGKILL)
    print("EXIT-CODES " + json.dumps([codes[r] for r in range(WORLD)]), flush=True)


@pytest.mark.distributed
def test_ddp_every_rank_takes_part_in_the_final_save(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE), str(tmp_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    log = (proc.stdout + proc.stderr)[-6000:]
    assert "EXIT-CODES [0, 0]" in proc.stdout, log
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    assert valid_steps(tmp_path / "run") == [4, 5, 8, 9]
    for rank, res in enumerate(ranks):
        ref, first, requeued, more = (res[k] for k in ("reference", "first", "requeued", "more"))
        assert first["global_step"] == 5, rank
        # requeued: restores the final save on every rank, trains nothing
        assert requeued["restored"] == 5 and requeued["trace"] == [], rank
        assert requeued["fingerprint"] == first["fingerprint"], rank
        # continued to 9 steps from it: each rank's own samples and state, bitwise
        assert more["restored"] == 5, rank
        assert more["trace"] == ref["trace"][5:], rank
        assert more["fingerprint"] == ref["fingerprint"], rank
    assert ranks[0]["more"]["fingerprint"] == ranks[1]["more"]["fingerprint"]


def test_an_epoch_end_save_resumes_with_every_epoch(
    reference: Callable[[str], dict[str, Any]], tmp_path: Path
) -> None:
    """Every(epochs=1) saves at on_train_epoch_end, where Lightning has already counted the
    epoch as processed: the checkpoint carries the loop state of that step's validation end,
    so a run that crashed in the next epoch resumes there and trains every remaining epoch
    (restored as it was at on_train_epoch_end, Lightning skipped one: 6 steps instead of 12)."""
    with pytest.raises(RuntimeError, match="boom in step 8"):
        train(tmp_path, max_epochs=3, save=sg.Every(epochs=1), raise_at=8)
    assert valid_steps(tmp_path) == [6]
    resumed = train(tmp_path, max_epochs=3, save=sg.Every(epochs=1))
    uninterrupted = reference("max_epochs=3")
    assert resumed["restored"] == 6
    assert resumed["global_step"] == 18
    assert resumed["trace"] == uninterrupted["trace"][6:]
    assert resumed["fingerprint"] == uninterrupted["fingerprint"]
    assert resumed["steps"] == [6, 12, 18]


if __name__ == "__main__":
    launcher_main(sys.argv[1:])
