"""One Keras 3 (torch backend) fit with savegame's callback, as a user writes it.

    python train.py CONFIG_JSON ROOT OUT KILL_AT

KILL_AT > 0: SIGKILL this process at the end of its KILL_AT-th training batch.
Writes OUT.ids.jsonl (sample ids per training batch), OUT.logs.jsonl (epoch logs) and, when fit
returns, OUT.npz (model, optimizer and metric variables) and OUT.json (lr, restored_step, ...).
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations.keras import SavegameCheckpoint  # noqa: E402

cfg = json.loads(sys.argv[1])
root, out, kill_at = sys.argv[2], sys.argv[3], int(sys.argv[4])
keras.utils.set_random_seed(cfg.get("seed", 0))
torch.use_deterministic_algorithms(True)

N, D, C, B = cfg.get("n", 96), 6, 3, cfg.get("batch", 16)
rs = np.random.RandomState(123)
x = rs.randn(N, D).astype("float32")
y = (np.argmax(x[:, :C] + 0.5 * rs.randn(N, C), 1)).astype("int64")
X = np.concatenate([x, np.arange(N, dtype="float32")[:, None]], 1)  # last column: sample id
w = (0.5 + rs.rand(N)).astype("float32")
xv = rs.randn(32, D).astype("float32")
Xv = np.concatenate([xv, np.full((32, 1), -1.0, "float32")], 1)
yv = np.argmax(xv[:, :C], 1).astype("int64")

ids_f = open(out + ".ids.jsonl", "a")


class Rec(keras.layers.Layer):
    """Records the sample ids of each training batch, drops the id column."""

    def call(self, inputs, training=None):
        if training:
            ids_f.write(json.dumps([int(v) for v in inputs[:, -1].detach().cpu().tolist()]) + "\n")
            ids_f.flush()
        return inputs[:, :-1]


def norm_layer():
    n = keras.layers.Normalization()
    n.adapt(x)
    return n


def body(kind):
    layers = [Rec()]
    if kind == "preproc":
        layers.append(norm_layer())
    layers += [
        keras.layers.Dense(16, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(C),
    ]
    return layers


def make_model(kind):
    if kind in ("seq", "preproc"):
        m = keras.Sequential([keras.Input((D + 1,)), *body(kind)])
    elif kind == "functional":
        inp = keras.Input((D + 1,))
        h = Rec()(inp)
        a = keras.layers.Dense(16, activation="relu")(h)
        b = keras.layers.Dense(16, activation="tanh")(h)
        h = keras.layers.Concatenate()([a, b])
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Dropout(0.3)(h)
        m = keras.Model(inp, keras.layers.Dense(C)(h))
    elif kind == "subclassed":

        class Net(keras.Model):
            def __init__(self):
                super().__init__()
                self.rec = Rec()
                self.d1 = keras.layers.Dense(16, activation="relu")
                self.bn = keras.layers.BatchNormalization()
                self.drop = keras.layers.Dropout(0.3)
                self.d2 = keras.layers.Dense(C)

            def call(self, inputs, training=None):
                h = self.rec(inputs, training=training)
                h = self.bn(self.d1(h), training=training)
                return self.d2(self.drop(h, training=training))

        m = Net()
        m(X[:2])
    else:
        raise ValueError(kind)
    return m


def make_opt(kind):
    lr = 1e-2
    if kind == "adam":
        return keras.optimizers.Adam(lr)
    if kind == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=0.05)
    if kind == "ema":
        return keras.optimizers.Adam(lr, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4)
    if kind == "accum":
        return keras.optimizers.Adam(lr, gradient_accumulation_steps=2)
    if kind == "lsf":
        return keras.optimizers.SGD(0.05, momentum=0.9, loss_scale_factor=128.0)
    if kind == "schedule":
        return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(2e-2, 5, 0.8))
    raise ValueError(kind)


model = make_model(cfg.get("model", "seq"))
model.compile(
    optimizer=make_opt(cfg.get("opt", "adam")),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)


class PyDS(keras.utils.PyDataset):
    def __init__(self, with_w):
        super().__init__()
        self.with_w = with_w

    def __len__(self):
        return (N + B - 1) // B

    def __getitem__(self, i):
        s = slice(i * B, (i + 1) * B)
        return (X[s], y[s], w[s]) if self.with_w else (X[s], y[s])


data = cfg.get("data", "numpy")
fit_kw = dict(epochs=cfg.get("epochs", 4), verbose=0)
loader = None
if data == "numpy":
    fit_kw.update(x=X, y=y, batch_size=B, shuffle=True)
    if cfg.get("sample_weight"):
        fit_kw["sample_weight"] = w
elif data == "pydataset":
    fit_kw.update(x=PyDS(cfg.get("sample_weight", False)), shuffle=True)
else:
    tensors = [torch.from_numpy(X), torch.from_numpy(y)]
    if cfg.get("sample_weight"):
        tensors.append(torch.from_numpy(w))
    ds = torch.utils.data.TensorDataset(*tensors)
    if data == "torch_dl":
        fit_kw.update(x=torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True))
    elif data == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader = StatefulDataLoader(ds, batch_size=B, shuffle=True)
        fit_kw.update(x=loader, shuffle=False)
    else:
        raise ValueError(data)
val = cfg.get("val")
if val == "split":
    fit_kw["validation_split"] = 0.25
elif val == "data_freq":
    fit_kw.update(validation_data=(Xv, yv), validation_freq=2)
elif val == "data":
    fit_kw.update(validation_data=(Xv, yv))
if cfg.get("class_weight"):
    fit_kw["class_weight"] = {0: 1.0, 1: 2.0, 2: 0.5}
if cfg.get("initial_epoch"):
    fit_kw["initial_epoch"] = cfg["initial_epoch"]


def every(spec):
    return sg.Every(**spec) if spec else None


keep = sg.Keep(**cfg["keep"]) if cfg.get("keep") else None
sgcb = SavegameCheckpoint(
    root,
    loader=loader,
    save=every(cfg.get("save")),
    keep=keep,
    async_save=cfg.get("async_save", True),
    verbose=0,
)

callbacks = []
extra = cfg.get("extra")
if extra == "plateau":
    callbacks.append(
        keras.callbacks.ReduceLROnPlateau(
            monitor="loss", factor=0.5, patience=1, min_delta=0.05, verbose=0
        )
    )
elif extra == "early":
    callbacks.append(
        keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=0.05, verbose=0)
    )
elif extra == "lrsched":
    callbacks.append(keras.callbacks.LearningRateScheduler(lambda e, lr: 1e-2 * 0.5**e))
callbacks.append(sgcb)


class Spy(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.n = 0
        self.logs = open(out + ".logs.jsonl", "a")

    def on_epoch_end(self, epoch, logs=None):
        rec = {k: float(v) for k, v in (logs or {}).items()}
        rec["lr_now"] = float(np.asarray(self.model.optimizer.learning_rate))
        self.logs.write(json.dumps({"epoch": epoch, "logs": rec}) + "\n")
        self.logs.flush()

    def on_train_batch_end(self, batch, logs=None):
        self.n += 1
        if self.n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


callbacks.append(Spy())
if cfg.get("first_epochs"):
    # a first fit, then evaluate/predict in between, then fit again (same model, same callback
    # unless "new_callback"), as in a notebook
    history = model.fit(callbacks=callbacks, **{**fit_kw, "epochs": cfg["first_epochs"]})
    model.evaluate(Xv, yv, verbose=0)
    model.predict(Xv, verbose=0)
    if cfg.get("new_callback"):
        sgcb = SavegameCheckpoint(
            root,
            loader=loader,
            save=every(cfg.get("save")),
            keep=keep,
            async_save=cfg.get("async_save", True),
            verbose=0,
        )
        callbacks = [c for c in callbacks if not isinstance(c, SavegameCheckpoint)]
        callbacks.insert(len(callbacks) - 1, sgcb)
history = model.fit(callbacks=callbacks, **fit_kw)


def dump(tag, variables):
    return {
        f"{tag}{i:03d}": np.asarray(keras.ops.convert_to_numpy(v)) for i, v in enumerate(variables)
    }


arrays = {}
arrays.update(dump("model", model.variables))
arrays.update(dump("opt", model.optimizer.variables))
arrays.update(dump("metric", [v for m in model.metrics for v in m.variables]))
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(
        {
            "restored_step": sgcb.restored_step,
            "iterations": int(np.asarray(model.optimizer.iterations)),
            "lr": float(np.asarray(model.optimizer.learning_rate)),
            "history_epochs": history.epoch,
            "stop_training": bool(model.stop_training),
            "steps": sorted(
                int(p.name.split("-")[1]) for p in __import__("pathlib").Path(root).glob("step-*")
            ),
        },
        f,
    )
