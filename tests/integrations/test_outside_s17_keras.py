"""Outside review s17: savegame's Keras 3 callback as a `BackupAndRestore`/`ModelCheckpoint` user
meets it (docs/integrations.md, "Keras 3 (torch backend)").

The promise under test: a `fit` SIGKILLed at a seeded random batch and started again with the
same script ends bitwise equal (variables, optimizer variables incl. `iterations`, metric
variables, epoch logs, data order) to a `fit` never interrupted, across the setups a user
combines: numpy arrays with `shuffle=True`, `validation_split`, `validation_data` +
`validation_freq`, `class_weight`/`sample_weight`, a `PyDataset`, a plain torch `DataLoader`,
a `StatefulDataLoader` as `loader=`; AdamW, EMA, gradient accumulation, `loss_scale_factor`, an
LR schedule; ReduceLROnPlateau / EarlyStopping / LearningRateScheduler beside the callback;
BatchNormalization + seeded Dropout in Sequential, functional and subclassed models, an adapted
`Normalization` layer. Without `loader=` only epoch-end checkpoints are exact (the docs say a
mid-epoch one restarts its epoch), so those setups save every epoch.

Each training runs `_outside_s17_keras/train.py` in a subprocess (KERAS_BACKEND=torch).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("torchdata")
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("needs KERAS_BACKEND=torch", allow_module_level=True)

import savegame as sg  # noqa: E402
from savegame.integrations.keras import ExactnessWarning, SavegameCheckpoint  # noqa: E402

SCRIPT = Path(__file__).parent / "_outside_s17_keras" / "train.py"
ENV = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _start(cfg: dict, root: Path, out: Path, kill_at: int = -1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), json.dumps(cfg), str(root), str(out), str(kill_at)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(p: subprocess.Popen, what: str, expect_rc: int = 0) -> str:
    text, _ = p.communicate(timeout=240)
    assert p.returncode == expect_rc, f"{what}: exit {p.returncode}\n{text[-3000:]}"
    return text


def _result(out: Path) -> dict:
    with np.load(str(out) + ".npz") as npz:
        arrays = dict(npz)
    meta = json.loads(Path(str(out) + ".json").read_text())
    ids = [json.loads(line) for line in Path(str(out) + ".ids.jsonl").read_text().splitlines()]
    return {"arrays": arrays, "meta": meta, "ids": ids}


def _logs(*outs: Path) -> dict:
    """Epoch logs merged over processes, a later process's epoch replacing an earlier one's."""
    merged: dict = {}
    for out in outs:
        path = Path(str(out) + ".logs.jsonl")
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                merged[rec["epoch"]] = rec["logs"]
    return merged


def _assert_same(ref: dict, got: dict, ref_logs: dict, got_logs: dict) -> None:
    assert sorted(ref["arrays"]) == sorted(got["arrays"])
    diff = [
        k
        for k in sorted(ref["arrays"])
        if ref["arrays"][k].tobytes() != got["arrays"][k].tobytes()
        or ref["arrays"][k].dtype != got["arrays"][k].dtype
    ]
    assert not diff, f"variables differ from the uninterrupted run: {diff}"
    for key in ("iterations", "lr", "stop_training"):
        assert ref["meta"][key] == got["meta"][key], key
    assert got_logs == ref_logs, "epoch logs differ from the uninterrupted run"
    # data order: what the resumed process trained on is the uninterrupted run's tail
    n = len(got["ids"])
    assert n > 0
    assert got["ids"] == ref["ids"][-n:], "the resumed process saw other batches"


def _killed_and_resumed(tmp_path: Path, cfg: dict, total_batches: int, first_safe: int, seed: int):
    """Reference and killed run side by side, then the same script again; returns both results."""
    kill_at = random.Random(seed).randint(first_safe, total_batches - 1)
    ref_p = _start(cfg, tmp_path / "ref-run", tmp_path / "ref")
    kill_p = _start(cfg, tmp_path / "run", tmp_path / "killed", kill_at)
    _wait(ref_p, "uninterrupted run")
    _wait(kill_p, f"run killed at batch {kill_at}", expect_rc=-9)
    _wait(_start(cfg, tmp_path / "run", tmp_path / "resumed"), "resumed run")
    ref, got = _result(tmp_path / "ref"), _result(tmp_path / "resumed")
    return (
        kill_at,
        ref,
        got,
        _logs(tmp_path / "ref"),
        _logs(tmp_path / "killed", tmp_path / "resumed"),
    )


# (config, batches in the whole fit, first batch a kill may hit: a few batches after the first
# save, so that an async save is committed (a save in flight is lost by SIGKILL, as documented))
# numpy / PyDataset / plain DataLoader: every epoch (the docs' exact case without loader=);
# 96 samples, batch 16 -> 6 batches per epoch (5 with validation_split=0.25: 72 samples).
SETUPS = {
    "numpy_shuffle_split_sample_weight_adamw_sequential": (
        dict(
            data="numpy",
            val="split",
            sample_weight=True,
            opt="adamw",
            model="seq",
            keep=dict(last=1, best=1, monitor="val_loss", mode="min"),
        ),
        20,
        8,
    ),
    "numpy_valdata_freq2_class_weight_schedule_functional": (
        dict(data="numpy", val="data_freq", class_weight=True, opt="schedule", model="functional"),
        24,
        9,
    ),
    "pydataset_shuffle_sample_weight_adamw_subclassed": (
        dict(data="pydataset", sample_weight=True, opt="adamw", model="subclassed", val="data"),
        24,
        9,
    ),
    "plain_dataloader_lsf_normalization_layer": (
        dict(data="torch_dl", opt="lsf", model="preproc", val="data_freq"),
        24,
        9,
    ),
    # StatefulDataLoader as loader=: mid-epoch saves are exact
    "stateful_every3_valdata_freq2_sample_weight_adamw_functional": (
        dict(
            data="stateful",
            save=dict(steps=3),
            val="data_freq",
            sample_weight=True,
            opt="adamw",
            model="functional",
            keep=dict(last=2, best=1, monitor="val_accuracy", mode="max"),
        ),
        24,
        6,
    ),
    "stateful_every5_sample_weight_schedule_subclassed_sync": (
        dict(
            data="stateful",
            save=dict(steps=5),
            sample_weight=True,
            opt="schedule",
            model="subclassed",
            async_save=False,
        ),
        24,
        6,
    ),
    "stateful_every3_lsf_normalization_layer": (
        dict(data="stateful", save=dict(steps=3), opt="lsf", model="preproc", val="data"),
        24,
        6,
    ),
    "stateful_every4_learning_rate_scheduler": (
        dict(data="stateful", save=dict(steps=4), extra="lrsched", val="data"),
        24,
        7,
    ),
    "stateful_initial_epoch_1_every3_adamw": (
        dict(data="stateful", save=dict(steps=3), initial_epoch=1, opt="adamw", val="data"),
        18,
        6,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_sigkill_at_a_seeded_batch_resumes_bitwise_s17(tmp_path, name):
    cfg, total, first_safe = SETUPS[name]
    kill_at, ref, got, ref_logs, got_logs = _killed_and_resumed(
        tmp_path, cfg, total, first_safe, seed=zlib.crc32(name.encode())
    )
    assert got["meta"]["restored_step"], f"killed at batch {kill_at}: nothing was restored"
    _assert_same(ref, got, ref_logs, got_logs)


# ---------------------------------------------------------------- callbacks beside savegame's


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, first_kill, last_kill",
    [
        # the uninterrupted fit cuts the LR at the ends of epochs 4 and 5 (0-based); killed in
        # epoch 5 (after batch 31), the resumed fit's fresh ReduceLROnPlateau (best=inf) does not
        pytest.param("plateau", 31, 35),
        # the uninterrupted fit stops after epoch 4 (30 batches); killed in epochs 3-4, the
        # resumed fit's fresh EarlyStopping (wait=0) trains epoch 5 as well
        pytest.param("early", 20, 29),
        ("lrsched", 10, 35),
    ],
)
def test_keras_callbacks_beside_it_killed_and_resumed_s17(tmp_path, extra, first_kill, last_kill):
    """ReduceLROnPlateau(monitor="loss", patience=1, min_delta=0.05) / EarlyStopping(same) /
    LearningRateScheduler next to the callback, saves every 4 steps, SIGKILLed mid-run: the
    resumed fit should end as the uninterrupted one (same LR cuts, same stopping epoch, same
    logs). BackupAndRestore keeps no callback state either; the Lightning integration does."""
    cfg = dict(data="stateful", save=dict(steps=4), extra=extra, val="data", epochs=6, opt="adam")
    _, ref, got, ref_logs, got_logs = _killed_and_resumed(
        tmp_path, cfg, last_kill + 1, first_kill, seed=17
    )
    assert got["meta"]["restored_step"]
    _assert_same(ref, got, ref_logs, got_logs)


# ---------------------------------------------------------------- fit again / requeue


@pytest.mark.slow
@pytest.mark.parametrize(
    "opt",
    [
        "adamw",
        "ema",
        pytest.param(
            "accum",
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "NOT SUPPORTED YET (docs/integrations.md): gradient_accumulation_steps is "
                    "refused at fit start with UnsupportedSetupError"
                ),
            ),
        ),
    ],
)
def test_requeued_with_more_epochs_equals_the_uninterrupted_longer_fit_s17(tmp_path, opt):
    """docs: "continued with a larger `epochs`, it ends bitwise equal to an uninterrupted run".
    A 2-epoch job (ended normally, its end saved), then the same script with epochs=4, against
    one uninterrupted 4-epoch fit."""
    base = dict(data="stateful", save=dict(steps=5), opt=opt, val="data")
    ref_p = _start({**base, "epochs": 4}, tmp_path / "ref-run", tmp_path / "ref")
    _wait(_start({**base, "epochs": 2}, tmp_path / "run", tmp_path / "first"), "2-epoch job")
    _wait(ref_p, "uninterrupted 4-epoch run")
    _wait(_start({**base, "epochs": 4}, tmp_path / "run", tmp_path / "more"), "4-epoch job")
    ref, got = _result(tmp_path / "ref"), _result(tmp_path / "more")
    assert got["meta"]["restored_step"] == 12
    _assert_same(ref, got, _logs(tmp_path / "ref"), _logs(tmp_path / "first", tmp_path / "more"))


@pytest.mark.slow
@pytest.mark.parametrize("new_callback", [False, True], ids=["same_callback", "new_callback"])
def test_second_fit_after_evaluate_and_predict_continues_the_step_count_s17(tmp_path, new_callback):
    """fit(epochs=2); evaluate(); predict(); fit(epochs=4) on the same model in one process: the
    second fit resumes at epoch 2 / step 12 (the docs: "fit again resumes") and the run ends
    as one uninterrupted 4-epoch fit; evaluate/predict in between change nothing."""
    base = dict(data="stateful", save=dict(steps=5), val="data", epochs=4, opt="adamw")
    ref_p = _start(base, tmp_path / "ref-run", tmp_path / "ref")
    _wait(
        _start(
            {**base, "first_epochs": 2, "new_callback": new_callback},
            tmp_path / "run",
            tmp_path / "two",
        ),
        "two fits",
    )
    _wait(ref_p, "uninterrupted run")
    ref, got = _result(tmp_path / "ref"), _result(tmp_path / "two")
    assert got["meta"]["restored_step"] == 12
    assert got["meta"]["history_epochs"] == [2, 3]
    got["ids"] = got["ids"][-24:]  # the second fit's batches
    _assert_same(ref, got, _logs(tmp_path / "ref"), _logs(tmp_path / "two"))


@pytest.mark.xfail(
    strict=True,
    reason=(
        "NOT SUPPORTED YET (docs/integrations.md): gradient_accumulation_steps is refused at fit "
        "start with UnsupportedSetupError (it died with AttributeError at the first batch)"
    ),
)
def test_gradient_accumulation_fit_with_the_callback_trains_s17(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).randn(32, 4).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    cb = SavegameCheckpoint(tmp_path / "run", async_save=False, verbose=0)
    model.fit(x, y, epochs=2, batch_size=8, callbacks=[cb], verbose=0)
    assert int(model.optimizer.iterations.detach().cpu()) == 4  # 8 batches, 2 per step
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000000000004"]


# ---------------------------------------------------------------- Keep rules


def _fit_with_keep(root: Path, keep, epochs: int = 6):
    keras.utils.set_random_seed(3)
    rs = np.random.RandomState(3)
    x = rs.randn(64, 4).astype("float32")
    y = (x[:, 0] + 0.8 * rs.randn(64) > 0).astype("int64")
    xv = rs.randn(24, 4).astype("float32")
    yv = (xv[:, 0] + 0.8 * rs.randn(24) > 0).astype("int64")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(
        keras.optimizers.SGD(0.5),  # a big step: the validation metrics jump about
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    cb = SavegameCheckpoint(root, keep=keep, async_save=False, verbose=0)
    h = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=16,
        validation_data=(xv, yv),
        callbacks=[cb],
        verbose=0,
        shuffle=True,
    )
    steps = sorted(int(p.name.split("-")[1]) for p in Path(root).glob("step-*"))
    return h.history, steps


@pytest.mark.parametrize(
    "monitor, mode", [("val_loss", "min"), ("val_accuracy", "max"), ("val_loss", None)]
)
def test_keep_best_by_a_validation_metric_keeps_the_right_epoch_s17(tmp_path, monitor, mode):
    """Keep(last=1, best=1, monitor=..., mode=...) with every-epoch saves: the kept checkpoints
    are the last epoch's and the best epoch's (4 steps per epoch)."""
    kw = dict(last=1, best=1, monitor=monitor) | ({"mode": mode} if mode else {})
    hist, steps = _fit_with_keep(tmp_path / "run", sg.Keep(**kw))
    values = [float(v) for v in hist[monitor]]
    best = int(np.argmax(values) if mode == "max" else np.argmin(values))
    assert steps == sorted({4 * len(values), 4 * (best + 1)}), (values, steps)


def test_keep_best_by_val_accuracy_without_a_mode_is_inferred_or_refused_s17(tmp_path):
    """A ModelCheckpoint(monitor="val_accuracy") user writes Keep(best=1, monitor="val_accuracy").
    Either that is refused at once (a ValueError naming mode="max") or the best accuracy is
    kept - never the worst."""
    try:
        keep = sg.Keep(last=1, best=1, monitor="val_accuracy")
    except ValueError as e:
        assert "max" in str(e)
        return
    hist, steps = _fit_with_keep(tmp_path / "run", keep)
    accs = [float(v) for v in hist["val_accuracy"]]
    worst, best = int(np.argmin(accs)), int(np.argmax(accs))
    assert worst != len(accs) - 1, "premise: the worst epoch is not also the last one kept"
    assert 4 * (worst + 1) not in steps, (accs, steps)
    assert 4 * (best + 1) in steps, (accs, steps)


# ---------------------------------------------------------------- a model built by fit


def test_a_model_fit_builds_resumes_in_a_new_unbuilt_model_s17(tmp_path):
    """The docs ask for a built model; a Sequential without Input (built by fit) works too: the
    second fit (new model, new callback, same folder, like a restarted script) resumes at
    epoch 2 and ends equal to an uninterrupted 3-epoch fit."""

    def make():
        m = keras.Sequential(
            [
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dropout(0.3),
                keras.layers.Dense(2),
            ]
        )
        m.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return m

    x = np.random.RandomState(0).randn(64, 4).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    kw = dict(batch_size=16, verbose=0, shuffle=True)
    keras.utils.set_random_seed(0)
    ref = make()
    ref.fit(x, y, epochs=3, **kw)
    keras.utils.set_random_seed(0)
    make().fit(x, y, epochs=2, callbacks=[SavegameCheckpoint(tmp_path / "run", verbose=0)], **kw)
    keras.utils.set_random_seed(0)
    model, cb = make(), SavegameCheckpoint(tmp_path / "run", verbose=0)
    model.fit(x, y, epochs=3, callbacks=[cb], **kw)
    assert cb.restored_step == 8
    for a, b in zip(
        ref.variables + ref.optimizer.variables,
        model.variables + model.optimizer.variables,
        strict=True,
    ):
        assert np.array_equal(a.value.detach().cpu().numpy(), b.value.detach().cpu().numpy())


def test_gradient_accumulation_is_refused_before_anything_is_trained_s17(tmp_path):
    from savegame.integrations.keras import UnsupportedSetupError

    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).randn(32, 4).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [v.value.detach().clone() for v in model.weights]
    cb = SavegameCheckpoint(tmp_path / "run", async_save=False, verbose=0)
    with pytest.raises(UnsupportedSetupError, match="gradient_accumulation_steps"):
        model.fit(x, y, epochs=1, batch_size=8, callbacks=[cb], verbose=0)
    after = [v.value.detach() for v in model.weights]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not list((tmp_path / "run").glob("step-*"))


def _es_fit(root: Path, epochs: int, callbacks_after: bool = False):
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).randn(32, 4).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        keras.optimizers.SGD(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    es = keras.callbacks.EarlyStopping(monitor="loss", patience=50, min_delta=10.0)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=50, min_delta=10.0)
    cb = SavegameCheckpoint(root, async_save=False, verbose=0)
    seen: list[tuple[int, Any, int, int]] = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append((es.wait, es.best, plateau.wait, plateau.cooldown_counter))

    order = [cb, es, plateau, Spy()] if callbacks_after else [es, plateau, cb, Spy()]
    model.fit(x, y, epochs=epochs, batch_size=8, callbacks=order, verbose=0)
    return es, plateau, seen


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' own
def test_early_stopping_and_plateau_state_comes_back_with_the_fit_s17(tmp_path):
    """Saved at each epoch's end (after their on_epoch_end: they come first in the list), given
    back at the resumed fit's first epoch: their on_train_begin would start them afresh."""
    es, plateau, _ = _es_fit(tmp_path / "run", 3)
    assert es.wait == 2 and plateau.wait == 2  # min_delta: no epoch counts as a gain
    es2, plateau2, seen = _es_fit(tmp_path / "run", 4)
    assert seen[0] == (es.wait, es.best, plateau.wait, plateau.cooldown_counter)
    assert es2.wait == 3


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' own
def test_a_stateful_callback_after_it_is_warned_about_s17(tmp_path):
    with pytest.warns(ExactnessWarning, match="EarlyStopping, ReduceLROnPlateau comes after it"):
        _es_fit(tmp_path / "run", 1, callbacks_after=True)
