"""Outside review (s14b), as a new user with docs/integrations.md only: the Keras callback
(torch backend) after a SIGKILL at a (seeded) random step with ``Every(steps=N)``,
``steps_per_epoch``, ``initial_epoch``, ``validation_data``, a ``stop_training`` from another
callback, and ``fit`` called twice as in a notebook — each compared bitwise (every model and
optimizer variable) with an uninterrupted run.

This file is also the training script its tests start (``python this_file.py JSON``), so the
SIGKILL is a real one; the remote tests (tests/remote/test_outside_s14b_remote.py) reuse it.
A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":  # pragma: no cover
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)
pytest.importorskip("keras")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations import keras as sgk  # noqa: E402

HERE = Path(__file__).resolve()
SAMPLES, BATCH = 48, 8  # 6 steps per epoch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Your input ran out of data"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def data(n: int = SAMPLES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)))


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


class Steps(keras.callbacks.Callback):
    """Counts batches trained; SIGKILLs after step ``kill_at``; stop_training after ``stop_at``."""

    def __init__(self, kill_at: int | None, stop_at: int | None) -> None:
        super().__init__()
        self.kill_at, self.stop_at, self.batches = kill_at, stop_at, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches += 1
        step = sgk._iterations(self.model)
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.stop_at:
            self.model.stop_training = True


def fingerprint(model: keras.Model) -> str:
    h = hashlib.sha256()
    for v in [*model.variables, *model.optimizer.variables]:
        h.update(str(tuple(v.shape)).encode())
        h.update(sgk._tensor(v).contiguous().numpy().tobytes())
    return h.hexdigest()


def fit(model: keras.Model, loader: Any, cb: Any, cfg: dict[str, Any], steps: Steps) -> Any:
    val = data(16, seed=2).tensors
    kw: dict[str, Any] = {}
    if cfg.get("validation", True):
        kw["validation_data"] = (val[0].numpy(), val[1].numpy())
    if cfg.get("steps_per_epoch"):
        kw["steps_per_epoch"] = cfg["steps_per_epoch"]
    return model.fit(loader, epochs=cfg.get("epochs", 3), initial_epoch=cfg.get("initial_epoch", 0),
                     callbacks=[cb, steps], shuffle=False, verbose=0, **kw)  # fmt: skip


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    model = build()
    loader = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    keep = sg.Keep(**cfg["keep"]) if "keep" in cfg else sg.Keep(last=20)
    cb = sgk.SavegameCheckpoint(cfg["root"], loader=loader, save=sg.Every(**cfg.get("save", {"steps": 4})),
                                keep=keep, async_save=cfg.get("async_save", True), verbose=0)  # fmt: skip
    steps = Steps(cfg.get("kill_at"), cfg.get("stop_at"))
    hist = fit(model, loader, cb, cfg, steps)
    with sg.Checkpointer(cfg["root"], handle_signals=False) as ck:
        saved = sorted(c.step for c in ck.list() if c.valid)
    return {
        "fingerprint": fingerprint(model),
        "restored": cb.restored_step,
        "trained": steps.batches,
        "iterations": int(sgk._iterations(model)),
        "steps": saved,
        "history": {k: [float(x) for x in v] for k, v in hist.history.items()},
    }


def run_script(
    cfg: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, dict[str, Any] | None, str]:
    proc = subprocess.run(
        [sys.executable, str(HERE), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "KERAS_BACKEND": "torch", "PYTHONHASHSEED": "0", **(env or {})},
    )
    out = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
    return proc.returncode, out, proc.stderr[-3000:]


def kill_step(seed: int, lo: int, hi: int) -> int:
    return random.Random(seed).randint(lo, hi)


def crash_and_resume(
    cfg: dict[str, Any], kill_at: int, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    ref = train({**cfg, "root": str(tmp / "ref")})
    rc, _, err = run_script({**cfg, "root": str(tmp / "run"), "kill_at": kill_at})
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "root": str(tmp / "run")})
    return ref, resumed


def assert_bitwise(ref: dict[str, Any], resumed: dict[str, Any]) -> None:
    # a SIGKILL loses an async save still in flight (docs): then the previous one (or none)
    restored = resumed["restored"] or 0
    assert resumed["iterations"] == ref["iterations"]
    assert resumed["trained"] == ref["iterations"] - restored
    assert resumed["fingerprint"] == ref["fingerprint"]


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])  # CI < 20 min
def test_every_steps_with_validation_killed_at_a_random_step_resumes_bitwise(
    tmp_path: Path, seed: int
) -> None:
    cfg = {"save": {"steps": 4}, "epochs": 3}
    ref, resumed = crash_and_resume(cfg, kill_step(seed, 5, 17), tmp_path)
    assert_bitwise(ref, resumed)
    # the epochs after the resume log what the uninterrupted run logged
    n = len(resumed["history"]["val_loss"])
    assert resumed["history"]["val_loss"] == ref["history"]["val_loss"][-n:]


@pytest.mark.parametrize(
    "kill_at",
    [
        5,  # restored from step 3 (mid-epoch 1; the fixed bug: the resumed epoch ran to the pass's end)
        7,  # restored from step 6 (in epoch 2, where the loader ran out)
    ],
)
def test_steps_per_epoch_killed_mid_run_resumes_bitwise(tmp_path: Path, kill_at: int) -> None:
    """steps_per_epoch=4 over a 6-batch loader; sync saves, so the restored step is the last one
    due before the kill (3 or 6). More positions: test_keras_s15_steps_per_epoch.py."""
    cfg = {"save": {"steps": 3}, "epochs": 3, "steps_per_epoch": 4, "async_save": False}
    ref = train({**cfg, "root": str(tmp_path / "ref")})
    assert ref["iterations"] == 10  # Keras: 4 + 2 (the loader ran out) + 4
    rc, _, err = run_script({**cfg, "root": str(tmp_path / "run"), "kill_at": kill_at})
    assert rc == -signal.SIGKILL, err
    resumed = train({**cfg, "root": str(tmp_path / "run")})
    assert resumed["restored"] == (kill_at // 3) * 3
    assert_bitwise(ref, resumed)


def test_initial_epoch_killed_mid_run_resumes_bitwise(tmp_path: Path) -> None:
    """fit(epochs=4, initial_epoch=1): 3 epochs trained, as Keras counts them."""
    cfg = {"save": {"steps": 5}, "epochs": 4, "initial_epoch": 1}
    ref, resumed = crash_and_resume(cfg, kill_step(4, 6, 17), tmp_path)
    assert ref["iterations"] == 18
    assert_bitwise(ref, resumed)


def test_stop_training_from_another_callback_then_fit_again_continues_bitwise(
    tmp_path: Path,
) -> None:
    """A notebook: fit stopped by another callback at step 9 (mid-epoch 2); the cell run again
    without the stop (a new model object, a new callback) ends equal to an uninterrupted run;
    run a third time it trains nothing."""
    cfg = {"save": {"steps": 4}, "epochs": 3}
    ref = train({**cfg, "root": str(tmp_path / "ref")})
    run = str(tmp_path / "run")
    first = train({**cfg, "root": run, "stop_at": 9})
    assert first["iterations"] == 9 and 9 in first["steps"]
    second = train({**cfg, "root": run})
    assert_bitwise(ref, second)
    third = train({**cfg, "root": run})
    assert third["trained"] == 0 and third["restored"] == 18
    assert third["fingerprint"] == ref["fingerprint"]


def test_fit_twice_on_the_same_model_and_callback_in_one_cell(tmp_path: Path) -> None:
    """model.fit(epochs=1) then model.fit(epochs=3) with the same objects: equal to fit(epochs=3)."""
    ref = train({"save": {"steps": 4}, "epochs": 3, "root": str(tmp_path / "ref")})
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = build()
    loader = StatefulDataLoader(data(), batch_size=BATCH, shuffle=True)
    cb = sgk.SavegameCheckpoint(tmp_path / "run", loader=loader, save=sg.Every(steps=4),
                                keep=sg.Keep(last=20), verbose=0)  # fmt: skip
    fit(model, loader, cb, {"epochs": 1}, Steps(None, None))
    steps = Steps(None, None)
    fit(model, loader, cb, {"epochs": 3}, steps)
    assert steps.batches == 12
    assert fingerprint(model) == ref["fingerprint"]


@pytest.mark.slow  # ~17-20 s: the same promise is in CI through faster tests
def test_requeue_of_a_finished_run_in_a_new_process_trains_nothing(tmp_path: Path) -> None:
    cfg = {"save": {"steps": 4}, "epochs": 2, "root": str(tmp_path / "run")}
    rc, first, err = run_script(cfg)
    assert rc == 0 and first is not None, err
    assert 12 in first["steps"]
    rc, again, err = run_script(cfg)
    assert rc == 0 and again is not None, err
    assert again["trained"] == 0 and again["restored"] == 12
    assert again["fingerprint"] == first["fingerprint"]


if __name__ == "__main__":
    result = train(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
