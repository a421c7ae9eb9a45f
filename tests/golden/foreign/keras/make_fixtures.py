"""Regenerate the Keras golden fixtures with the real Keras 3 (not needed by the test suite).

Writes, next to this script: ``cnn.keras``, ``cnn.weights.h5``, ``cnn.h5`` (legacy
``model.save("m.h5")``), ``bf16.weights.h5`` (a bfloat16 Dense layer), ``expected.npz`` (the
input, the model's output and every variable as Keras holds it, keyed ``w:<variable path>``) and
``VERSIONS.txt``. Key invariant: the files are written by Keras itself; this script never edits
them afterwards.

Run in a separate environment (the test suite needs neither Keras nor a backend)::

    python3 -m venv /tmp/kerasvenv && /tmp/kerasvenv/bin/pip install keras jax[cpu] h5py
    /tmp/kerasvenv/bin/python tests/golden/foreign/keras/make_fixtures.py
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def build_cnn() -> keras.Model:
    """Conv2D -> BatchNormalization -> ReLU -> Flatten -> Dense on 8x8x3 inputs (NHWC)."""
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(5, name="d1"),
        ],
        name="cnn",
    )
    rng = np.random.default_rng(1234)
    for layer in model.layers:
        values = []
        for var in layer.weights:
            shape = tuple(var.shape)
            if var.path.endswith("moving_variance"):
                values.append(rng.uniform(0.5, 2.0, shape).astype("float32"))
            else:
                values.append(rng.normal(0.0, 0.5, shape).astype("float32"))
        if values:
            layer.set_weights(values)
    model.compile(optimizer="adam", loss="mse")
    return model


def main() -> None:
    keras.utils.set_random_seed(0)
    model = build_cnn()
    x = np.random.default_rng(7).normal(size=(2, 8, 8, 3)).astype("float32")
    y = np.asarray(model(x, training=False))
    model.save(HERE / "cnn.keras")
    model.save_weights(HERE / "cnn.weights.h5")
    model.save(HERE / "cnn.h5")  # legacy HDF5 (FORMATS.md §4.1); Keras warns, that is expected

    bf16 = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, dtype="bfloat16", name="dbf")], name="bf"
    )
    bf16.save_weights(HERE / "bf16.weights.h5")

    arrays: dict[str, np.ndarray] = {"x": x, "y": y}
    for var in model.weights:
        arrays[f"w:{var.path}"] = np.asarray(var.numpy())
    for var in bf16.weights:
        # bfloat16 as its raw 16 bits, so the npz needs no ml_dtypes to load.
        arrays[f"bf16:{var.path}"] = np.asarray(var.numpy()).view(np.uint16)
    np.savez(HERE / "expected.npz", **arrays)

    import h5py
    import jax

    (HERE / "VERSIONS.txt").write_text(
        f"keras {keras.__version__}\n"
        f"backend {keras.backend.backend()} (jax {jax.__version__})\n"
        f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})\n"
        f"numpy {np.__version__}\n"
        f"python {sys.version.split()[0]} on {platform.system()}\n"
    )


if __name__ == "__main__":
    main()
