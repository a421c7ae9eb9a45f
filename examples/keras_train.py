"""Keras 3 (torch backend) + savegame: a digits classifier that resumes mid-epoch, exactly.

    python examples/keras_train.py runs/keras-digits      # trains 5 epochs (~10 s on CPU)
    # interrupt it (Ctrl-C saves at the batch's end and exits 75), run it again:
    python examples/keras_train.py runs/keras-digits      # continues at the next batch

One callback does what ModelCheckpoint + BackupAndRestore do, in one atomic commit: weights,
optimizer, metrics, RNGs, epoch and the loader's position; best-2 by val_accuracy.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.integrations.keras import SavegameCheckpoint  # noqa: E402


def main(root: str) -> None:
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    loader = StatefulDataLoader(
        TensorDataset(torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400])),
        batch_size=32,
        shuffle=True,
    )
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ckpt = SavegameCheckpoint(
        root,
        loader=loader,
        save=sg.Every(steps=50),
        keep=sg.Keep(last=2, best=2, monitor="val_accuracy", mode="max"),
    )
    model.fit(
        loader,
        epochs=5,
        validation_data=(x[1400:], y[1400:]),
        callbacks=[ckpt],
        shuffle=False,  # the loader shuffles
        verbose=2,
    )
    print(f"resumed from step {ckpt.restored_step}" if ckpt.restored_step else "started fresh")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/keras-digits")
