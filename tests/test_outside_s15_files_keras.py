"""Outside review (s15): Keras files saved by the Keras 3 in this venv (torch backend) the way
users save them, read by savegame without Keras.

docs/formats-keras-darknet.md: Keras 3 ``model.save("m.keras")``, ``save_weights("m.weights.h5")``
and ``model.save("m.h5")`` are supported; "dtypes. bool, (u)int8-64, float16/32/64, ..., and
bfloat16 (Keras 3 stores it as a 2-byte opaque type with attribute dtype="bfloat16"; returned as
torch.bfloat16)"; nested models; optimizer weights. README: "Convert keeps names, dtypes and
values bit for bit" and diff of the source against the conversion matches.

The models mix the layer types users combine (Conv2D, BatchNormalization, DepthwiseConv2D, a
nested Sequential with LayerNormalization, Embedding + GRU, MultiHeadAttention, Bidirectional
LSTM) under a ``mixed_float16`` policy (so the optimizer is a LossScaleOptimizer) with bfloat16
and float16 layers. Writing them needs Keras (about 10-25 s): marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import savegame as sg
from savegame import errors

WRITER = r"""
import os, sys, json
os.environ["KERAS_BACKEND"] = "torch"
import numpy as np, keras
out = sys.argv[1]
keras.utils.set_random_seed(0)
keras.mixed_precision.set_global_policy("mixed_float16")

def model(with_bf16):
    inner = keras.Sequential([keras.layers.Dense(5, name="inner_d"), keras.layers.LayerNormalization(name="ln")], name="inner")
    img = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(img)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = inner(keras.layers.Flatten()(x))
    tok = keras.Input((3,), dtype="int32")
    e = keras.layers.Embedding(7, 4, name="emb")(tok)
    e = keras.layers.MultiHeadAttention(2, 3, name="mha")(e, e)
    g = keras.layers.GRU(2, name="gru")(e)
    b = keras.layers.Bidirectional(keras.layers.LSTM(3), name="bi")(e)
    x = keras.layers.Concatenate()([x, g, b])
    if with_bf16:
        x = keras.layers.Dense(3, dtype="bfloat16", name="bf")(x)
    x = keras.layers.Dense(2, dtype="float16", name="f16")(x)
    y = keras.layers.Dense(1, dtype="float32", name="head")(x)
    m = keras.Model([img, tok], y)
    m.compile(optimizer="adam", loss="mse")
    m.fit([np.random.rand(4, 6, 6, 3).astype("float32"), np.random.randint(0, 7, (4, 3))],
          np.random.rand(4, 1).astype("float32"), epochs=1, verbose=0)
    return m

def reference(m, tag):
    variables = list(m.weights) + list(m.optimizer.variables)
    arrays, dtypes = {}, {}
    for i, v in enumerate(variables):
        a = np.asarray(keras.ops.convert_to_numpy(v.value))
        dtypes[str(i)] = [v.path, str(v.dtype)]
        arrays[str(i)] = a.view(np.uint16) if str(v.dtype) == "bfloat16" else a
    np.savez(f"{out}/{tag}_ref.npz", **arrays)
    json.dump(dtypes, open(f"{out}/{tag}_ref.json", "w"))

m = model(True)
m.save(f"{out}/model.keras"); m.save_weights(f"{out}/model.weights.h5"); reference(m, "model")
# Keras 3 cannot load back a legacy .h5 holding bfloat16 weights, so that file comes from a model without them
m = model(False)
m.save(f"{out}/legacy.h5"); reference(m, "legacy")
"""


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (
        importlib.util.find_spec("keras") is None
    ):  # not imported here: it needs KERAS_BACKEND set first
        pytest.skip("keras is not installed")
    out = tmp_path_factory.mktemp("keras-s15")
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONHASHSEED": "0"}
    p = subprocess.run(
        [sys.executable, "-c", WRITER, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _reference(folder: Path, tag: str) -> list[tuple[str, str, np.ndarray]]:
    arrays = np.load(folder / f"{tag}_ref.npz")
    meta = json.loads((folder / f"{tag}_ref.json").read_text())
    return [(path, dtype, arrays[i]) for i, (path, dtype) in meta.items()]


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("file", "tag"),
    [("model.keras", "model"), ("model.weights.h5", "model"), ("legacy.h5", "legacy")],
)
def test_every_keras_variable_is_in_the_file_with_its_dtype_and_bits(
    keras_files: Path, file: str, tag: str
) -> None:
    ref = _reference(keras_files, tag)
    with sg.open(keras_files / file) as r:
        got = {k: r.read(k) for k in r.keys()}
        assert r.verify() == []
    # Keras writes a LossScaleOptimizer's variables twice (optimizer/vars and
    # optimizer/inner_optimizer/vars), so the file may hold more tensors than variables.
    assert len(got) >= len(ref), (sorted(got), [p for p, _, _ in ref])
    if tag == "model":
        assert {str(t.dtype) for t in got.values()} >= {
            "torch.bfloat16",
            "torch.float16",
            "torch.float32",
        }
    unmatched = list(got.items())
    for path, dtype, want in ref:
        for i, (_name, t) in enumerate(unmatched):
            if (
                str(t.dtype).removeprefix("torch.") == dtype
                and tuple(t.shape) == want.shape
                and np.array_equal(_as_numpy(t), want)
            ):
                del unmatched[i]
                break
        else:
            raise AssertionError(
                f"Keras variable {path} ({dtype}{list(want.shape)}) not found in {file}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("file", ["model.keras", "model.weights.h5", "legacy.h5"])
@pytest.mark.parametrize("to", ["savegame", "safetensors"])
def test_keras_file_converts_and_diffs_clean(
    keras_files: Path, tmp_path: Path, file: str, to: str
) -> None:
    dst = tmp_path / f"out-{to}"
    sg.convert(keras_files / file, dst, to=to)
    d = sg.diff(keras_files / file, dst)
    assert d.equal, d


@pytest.mark.slow
def test_layer_names_map_nested_and_wrapped_layers(keras_files: Path) -> None:
    with sg.open(keras_files / "model.keras") as r:
        names = r.metadata()["layer_names"]
    assert names["layers/sequential/layers/dense"] == "inner_d"
    assert names["layers/sequential/layers/layer_normalization"] == "ln"
    assert names["layers/multi_head_attention/query_dense"] == "query"
    assert names["layers/bidirectional/forward_layer/cell"] == "lstm_cell"
    assert names["layers/dense"] == "bf" and names["layers/dense_1"] == "f16"


def test_a_legacy_h5_with_an_untagged_2_byte_opaque_dataset_is_a_typed_error_naming_it(
    tmp_path: Path,
) -> None:
    """What Keras 3 ``model.save("m.h5")`` writes for a bfloat16 layer: ml_dtypes.bfloat16 stored
    by h5py as an opaque ``|V2`` with no ``dtype`` attribute (Keras cannot load it back either).
    The doc's table: "an opaque type without dtype="bfloat16"" -> UnsupportedFormatError."""
    h5py = pytest.importorskip("h5py")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    path = tmp_path / "bf.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "3.15.1"
        f.attrs["backend"] = "torch"
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([b"bf"])
        g = mw.create_group("bf")
        g.attrs["weight_names"] = np.array([b"bf/kernel"])
        g.create_dataset("bf/kernel", data=np.ones((2, 3), dtype=ml_dtypes.bfloat16))
    with pytest.raises(errors.UnsupportedFormatError, match="bf/kernel") as e:
        sg.open(path)
    assert e.value.path is not None
