"""Regenerate the TensorFlow checkpoint fixtures with the real TensorFlow.

Run OUTSIDE the savegame venv, in a throw-away venv that has TensorFlow (and, for the Keras 2
fixture, ``tf-keras``)::

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu tf-keras
    /tmp/tfvenv/bin/python tests/golden/foreign/tensorflow/make_fixtures.py

The test suite never imports TensorFlow: it compares savegame's reading to ``expected.json`` +
``expected.npz``, which hold what TensorFlow itself reads (``tf.train.load_checkpoint``) and the
Keras models' outputs on a fixed input.

Fixtures (all tiny):

* ``tf1/``      TF1 ``tf.compat.v1.train.Saver`` (graph mode): Dense-like variables, Adam slots,
                ``beta1_power``/``beta2_power``, int64 ``global_step``, a string variable, a
                2-way partitioned variables along axis 0 and axis 1 (slice entries),
                ``checkpoint`` pointer file.
* ``keras3/``   ``tf.train.Checkpoint`` of a Keras 3 CNN (Conv2D + BatchNormalization + ReLU +
                Flatten + Dense) and its Adam optimizer after one step, plus ``extra`` variables:
                string vector, int64, bfloat16, float16; written by ``CheckpointManager``.
* ``sharded/``  ``MaxShardSizePolicy(1000 bytes)``: 4 ``.data`` shards, variables split into
                slice entries (no ``checkpoint`` file: written with ``Checkpoint.write``).
* ``tfkeras/``  the same CNN with Keras 2 (``tf_keras``) and its legacy Adam:
                ``layer_with_weights-N`` names and real TF slot variables (``.OPTIMIZER_SLOT``).

``expected.json``: ``{fixture: {"prefix": ..., "tensors": {key: {"dtype", "shape", "npz" |
"strings_hex"}}, "output": npz name, "input": npz name}}``. bfloat16 values are stored in the
npz as their uint16 bit patterns (npz has no bfloat16).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = Path(__file__).resolve().parent
H, W, C_IN, FILTERS, CLASSES = 6, 6, 2, 3, 4


def _expected(prefix: Path, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    reader = tf.train.load_checkpoint(str(prefix))
    out: dict[str, object] = {}
    for key, dtype in sorted(reader.get_variable_to_dtype_map().items()):
        value = reader.get_tensor(key)
        entry: dict[str, object] = {"dtype": dtype.name, "shape": list(np.shape(value))}
        if dtype == tf.string:
            flat = np.asarray(value, dtype=object).reshape(-1)
            entry["strings_hex"] = [bytes(v).hex() for v in flat]
        else:
            arr = np.asarray(value)
            if dtype == tf.bfloat16:
                arr = arr.view(np.uint16)
            name = f"a{len(arrays)}"
            arrays[name] = np.array(arr, order="C", copy=True)  # keeps 0-d shapes
            entry["npz"] = name
        out[key] = entry
    return out


def make_tf1(out: Path, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    d = out / "tf1"
    tf1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        tf1.set_random_seed(1)
        x = tf1.placeholder(tf.float32, [None, 3])
        with tf1.variable_scope("dense"):
            k = tf1.get_variable(
                "kernel", [3, 2], initializer=tf1.random_normal_initializer(seed=2)
            )
            b = tf1.get_variable("bias", [2], initializer=tf1.zeros_initializer())
        part = tf1.get_variable(
            "part",
            [4, 2],
            initializer=tf1.random_normal_initializer(seed=3),
            partitioner=tf1.fixed_size_partitioner(2),
        )
        # Saved, not trained: split along axis 1, so slices are not contiguous in the result.
        tf1.get_variable(
            "part_cols",
            [2, 5],
            initializer=tf1.random_uniform_initializer(seed=4),
            partitioner=tf1.fixed_size_partitioner(2, axis=1),
            trainable=False,
        )
        tf1.get_variable(
            "name_str", initializer=tf.constant(b"tf1 string \x00\xff"), trainable=False
        )
        step = tf1.train.get_or_create_global_step()
        loss = tf.reduce_sum(tf.matmul(x, k) + b) + tf.reduce_sum(tf.concat(list(part), 0))
        train = tf1.train.AdamOptimizer(0.1).minimize(loss, global_step=step)
        saver = tf1.train.Saver(save_relative_paths=True)
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(3):
                sess.run(train, {x: np.ones((2, 3), np.float32)})
            prefix = saver.save(
                sess, str(d / "model.ckpt"), global_step=step, write_meta_graph=False
            )
    return {"prefix": os.path.relpath(prefix, out), "tensors": _expected(Path(prefix), arrays)}


def _cnn(keras):  # type: ignore[no-untyped-def]
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((H, W, C_IN)),
            layers.Conv2D(FILTERS, 3, padding="same", name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(CLASSES, name="fc"),
        ]
    )


def _train_and_perturb(model, opt, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    model.compile(optimizer=opt, loss="mse")
    xs = rng.normal(size=(8, H, W, C_IN)).astype(np.float32)
    ys = rng.normal(size=(8, CLASSES)).astype(np.float32)
    model.fit(xs, ys, epochs=1, batch_size=8, verbose=0)
    # Non-trivial BatchNormalization state, so a wrong mapping shows in eval-mode outputs.
    bn = model.layers[1]
    for var, lo, hi in zip(bn.weights, (0.5, -0.5, -0.5, 0.5), (1.5, 0.5, 0.5, 2.0), strict=True):
        var.assign(rng.uniform(lo, hi, size=var.shape).astype(np.float32))


def make_keras3(out: Path, arrays: dict[str, np.ndarray], x: np.ndarray) -> dict[str, object]:
    import keras

    d = out / "keras3"
    rng = np.random.default_rng(10)
    keras.utils.set_random_seed(10)
    model = _cnn(keras)
    opt = keras.optimizers.Adam(0.01)
    _train_and_perturb(model, opt, rng)
    extra = tf.Module()
    extra.strings = tf.Variable([b"alpha", b"", b"\x00bin\xff", "ünï".encode()], dtype=tf.string)
    extra.count = tf.Variable(np.int64(-(2**40) + 7))
    extra.half = tf.Variable(np.array([[1.5, -2.25], [65504.0, 6e-5]], np.float16))
    extra.brain = tf.Variable(tf.constant([1.0, -3.140625, 1e30, 0.0], tf.bfloat16))
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, extra=extra)
    manager = tf.train.CheckpointManager(ckpt, str(d), max_to_keep=1)
    prefix = manager.save()
    arrays["keras3_output"] = np.asarray(model(x, training=False))
    return {
        "prefix": os.path.relpath(prefix, out),
        "tensors": _expected(Path(prefix), arrays),
        "input": "input",
        "output": "keras3_output",
    }


def make_tfkeras(out: Path, arrays: dict[str, np.ndarray], x: np.ndarray) -> dict[str, object]:
    import tf_keras

    d = out / "tfkeras"
    rng = np.random.default_rng(20)
    tf_keras.utils.set_random_seed(20)
    model = _cnn(tf_keras)
    # The legacy optimizer keeps its state as TF slot variables (`.OPTIMIZER_SLOT` keys).
    opt = tf_keras.optimizers.legacy.Adam(0.01)
    _train_and_perturb(model, opt, rng)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(ckpt, str(d), max_to_keep=1)
    prefix = manager.save()
    arrays["tfkeras_output"] = np.asarray(model(x, training=False))
    return {
        "prefix": os.path.relpath(prefix, out),
        "tensors": _expected(Path(prefix), arrays),
        "input": "input",
        "output": "tfkeras_output",
    }


def make_sharded(out: Path, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    """TF >= 2.16 shard-size policy: 4 shards, large variables split into slices."""
    d = out / "sharded"
    m = tf.Module()
    m.a = tf.Variable(np.arange(300, dtype=np.float32) / 7)
    m.b = tf.Variable(np.arange(200, dtype=np.int64) - 100)
    m.c = tf.Variable(np.arange(100, dtype=np.float64).reshape(10, 10))
    m.s = tf.Variable([b"x" * 50, b"yy"])
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=1000)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    prefix = tf.train.Checkpoint(m=m).write(str(d / "ckpt"), options=options)
    return {"prefix": os.path.relpath(prefix, out), "tensors": _expected(Path(prefix), arrays)}


def main(out: Path = HERE) -> None:
    for sub in ("tf1", "keras3", "tfkeras", "sharded"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    x = np.random.default_rng(0).normal(size=(2, H, W, C_IN)).astype(np.float32)
    arrays["input"] = x
    expected = {
        "tf1": make_tf1(out, arrays),
        "keras3": make_keras3(out, arrays, x),
        "tfkeras": make_tfkeras(out, arrays, x),
        "sharded": make_sharded(out, arrays),
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    np.savez(out / "expected.npz", **arrays)
    import keras
    import tf_keras

    (out / "VERSIONS.txt").write_text(
        f"tensorflow {tf.__version__} (tensorflow-cpu wheel)\n"
        f"keras {keras.__version__} (fixture keras3/)\n"
        f"tf-keras {tf_keras.__version__} (fixture tfkeras/)\n"
        f"numpy {np.__version__}\n"
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
