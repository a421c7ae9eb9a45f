"""Keras reader against files written by the real Keras 3 (tests/golden/foreign/keras).

``expected.npz`` holds every variable as Keras held it when saving, the fixed input and the
model's output; neither Keras nor TensorFlow is needed here. Keras 2-era layouts (``dense_1/
kernel:0`` names, split ``layer_names0..N`` attributes) are built with h5py in ``tmp_path``
because no Keras 2 is installable next to Keras 3.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from savegame import errors
from savegame.adapters import mapping
from savegame.interop import base, keras

FIXTURES = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "keras"
EXPECTED = np.load(FIXTURES / "expected.npz")

# Keras 3 stores variables under the attribute path of their layer, in variable order
# (FORMATS.md §4.2); the legacy .h5 names them by variable path (§4.1).
KERAS3_NAMES = {
    "layers/conv2d/vars/0": "cnn/c1/kernel",
    "layers/conv2d/vars/1": "cnn/c1/bias",
    "layers/batch_normalization/vars/0": "cnn/bn/gamma",
    "layers/batch_normalization/vars/1": "cnn/bn/beta",
    "layers/batch_normalization/vars/2": "cnn/bn/moving_mean",
    "layers/batch_normalization/vars/3": "cnn/bn/moving_variance",
    "layers/dense/vars/0": "cnn/d1/kernel",
    "layers/dense/vars/1": "cnn/d1/bias",
}
LEGACY_ORDER = [
    "cnn/c1/kernel",
    "cnn/c1/bias",
    "cnn/bn/gamma",
    "cnn/bn/beta",
    "cnn/bn/moving_mean",
    "cnn/bn/moving_variance",
    "cnn/d1/kernel",
    "cnn/d1/bias",
]


def _expected(var_path: str) -> torch.Tensor:
    return torch.from_numpy(EXPECTED[f"w:{var_path}"].copy())


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copyfile(FIXTURES / name, dst)
    return dst


@pytest.mark.parametrize("fixture", ["cnn.keras", "cnn.weights.h5"])
def test_keras3_files_hold_exactly_what_keras_saved(fixture: str, tmp_path: Path) -> None:
    path = _copy(fixture, tmp_path)
    with keras.open_keras(path) as r:
        assert r.format == ("keras3" if fixture.endswith(".keras") else "keras-h5")
        assert r.layout == "keras3"
        model_keys = [k for k in r.keys() if k.startswith("layers/")]
        assert sorted(model_keys) == sorted(KERAS3_NAMES)
        # Variables of one layer come in variable order (vars/0, vars/1, …).
        assert model_keys.index("layers/conv2d/vars/0") < model_keys.index("layers/conv2d/vars/1")
        for name, var_path in KERAS3_NAMES.items():
            got = r.read(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, _expected(var_path)), name
            info = r.info(name)
            assert info == base.TensorInfo(name, "float32", tuple(got.shape), got.numel() * 4)
        assert r.tree()["layers"]["conv2d"]["vars"]["0"] == base.TensorRef("layers/conv2d/vars/0")
        meta = r.metadata()
        assert meta["layout"] == "keras3"
        assert meta["layer_names"]["layers/conv2d"] == "c1"
        assert r.verify() == []
    if fixture.endswith(".keras"):
        assert meta["keras_version"] == (FIXTURES / "VERSIONS.txt").read_text().split()[1]
        config = meta["model_config"]
        assert config["class_name"] == "Sequential"
        layer_classes = [layer["class_name"] for layer in config["config"]["layers"]]
        assert layer_classes == [
            "InputLayer",
            "Conv2D",
            "BatchNormalization",
            "ReLU",
            "Flatten",
            "Dense",
        ]


def test_legacy_h5_written_by_keras3(tmp_path: Path) -> None:
    path = _copy("cnn.h5", tmp_path)
    with keras.open_keras(path) as r:
        assert (r.format, r.layout) == ("keras-h5", "legacy")
        keys = r.keys()
        assert keys[: len(LEGACY_ORDER)] == LEGACY_ORDER
        assert all(k.startswith("optimizer_weights/") for k in keys[len(LEGACY_ORDER) :])
        for name in LEGACY_ORDER:
            assert torch.equal(r.read(name), _expected(name)), name
        assert r.tree()["c1"]["cnn/c1/kernel"] == base.TensorRef("cnn/c1/kernel")
        meta = r.metadata()
        assert meta["keras_version"] == "3.15.1" and meta["backend"] == "jax"
        assert meta["model_config"]["class_name"] == "Sequential"
        assert meta["training_config"]["loss"] == "mse"
        assert r.verify() == []


def test_bfloat16_weights(tmp_path: Path) -> None:
    path = _copy("bf16.weights.h5", tmp_path)
    with keras.open_keras(path) as r:
        assert r.info("layers/dense/vars/0") == base.TensorInfo(
            "layers/dense/vars/0", "bfloat16", (3, 2), 12
        )
        for name, var in (("layers/dense/vars/0", "kernel"), ("layers/dense/vars/1", "bias")):
            got = r.read(name)
            assert got.dtype == torch.bfloat16
            bits = torch.from_numpy(EXPECTED[f"bf16:bf/dbf/{var}"].astype(np.int32))
            assert torch.equal(got.view(torch.int16).to(torch.int32) & 0xFFFF, bits)


def test_listing_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def no_read(self: h5py.Dataset, *args: object, **kwargs: object) -> None:
        calls.append(self.name)
        raise AssertionError("tensor data read while listing")

    monkeypatch.setattr(h5py.Dataset, "read_direct", no_read)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_read)
    for fixture in ("cnn.keras", "cnn.h5", "cnn.weights.h5"):
        with keras.open_keras(_copy(fixture, tmp_path)) as r:
            for name in r.keys():
                r.info(name)
            r.tree()
            r.metadata()
    assert calls == []


def _write_keras2(path: Path, *, split: bool, full_model: bool) -> dict[str, np.ndarray]:
    """A Keras 2 style file: ``layer/…/kernel:0`` names, byte-string attributes."""
    rng = np.random.default_rng(5)
    layers = {
        "dense_1": {
            "dense_1/kernel:0": rng.normal(size=(3, 4)),
            "dense_1/bias:0": rng.normal(size=4),
        },
        "dropout": {},
        "dense_2": {
            "dense_2/kernel:0": rng.normal(size=(4, 2)),
            "dense_2/bias:0": rng.normal(size=2),
        },
        # A nested model whose weight name repeats one of dense_1's.
        "inner": {"dense_1/bias:0": rng.normal(size=4)},
    }
    expected: dict[str, np.ndarray] = {}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.4.0"
        f.attrs["backend"] = b"tensorflow"
        if full_model:
            f.attrs["model_config"] = b'{"class_name": "Sequential", "config": {"layers": []}}'
            root = f.create_group("model_weights")
        else:
            root = f
        names = np.array([n.encode() for n in layers])
        if split:
            root.attrs["layer_names0"] = names[:2]
            root.attrs["layer_names1"] = names[2:]
        else:
            root.attrs["layer_names"] = names
        for lname, weights in layers.items():
            g = root.create_group(lname)
            # Keras 2 writes weight_names in variable order: kernel before bias.
            g.attrs["weight_names"] = np.array([w.encode() for w in weights], dtype="S")
            for wname, value in weights.items():
                g.create_dataset(wname, data=value.astype(">f4"))  # big-endian on purpose
                key = wname if wname not in expected else f"{lname}/{wname}"
                expected[key] = value.astype("float32")
    return expected


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("full_model", [False, True])
def test_keras2_layouts(tmp_path: Path, split: bool, full_model: bool) -> None:
    path = tmp_path / "k2.h5"
    expected = _write_keras2(path, split=split, full_model=full_model)
    with keras.open_keras(path) as r:
        assert r.layout == "legacy"
        assert r.keys() == list(expected)
        assert r.keys()[:2] == ["dense_1/kernel:0", "dense_1/bias:0"]
        assert "inner/dense_1/bias:0" in r.keys()
        for name, value in expected.items():
            assert torch.equal(r.read(name), torch.from_numpy(value)), name
        meta = r.metadata()
        assert meta["keras_version"] == "2.4.0" and meta["backend"] == "tensorflow"
        assert (meta["model_config"] is not None) is full_model
        assert set(r.tree()) == {"dense_1", "dense_2", "inner"}


def test_missing_keras_version_means_keras1(tmp_path: Path) -> None:
    path = tmp_path / "k1.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"d"])
        g = f.create_group("d")
        g.attrs["weight_names"] = np.array([b"d_W"])
        g.create_dataset("d_W", data=np.ones((2, 2), "f8"))
    with keras.open_keras(path) as r:
        assert r.metadata()["keras_version"] is None
        assert r.read("d_W").dtype == torch.float64


# ---- end to end: the Keras CNN's weights in the equivalent PyTorch CNN ----------------------


def _torch_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, eps=1e-3),  # Keras' BatchNormalization default epsilon
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 4, 5),
    ).eval()


def _load_into_torch(model: nn.Sequential, w: dict[str, torch.Tensor]) -> None:
    """Keras layouts -> PyTorch (FORMATS.md §4.3), by hand."""
    conv, bn, _, _, fc = model
    with torch.no_grad():
        conv.weight.copy_(w["kernel_c"].permute(3, 2, 0, 1))  # (kh, kw, in, out) -> OIHW
        conv.bias.copy_(w["bias_c"])
        bn.weight.copy_(w["gamma"])
        bn.bias.copy_(w["beta"])
        bn.running_mean.copy_(w["mean"])
        bn.running_var.copy_(w["var"])
        # Keras flattens NHWC as (h, w, c); PyTorch flattens NCHW as (c, h, w): reorder the
        # Dense kernel's input rows before transposing (in, out) -> (out, in).
        k = w["kernel_d"].reshape(6, 6, 4, 5).permute(2, 0, 1, 3).reshape(144, 5)
        fc.weight.copy_(k.T)
        fc.bias.copy_(w["bias_d"])


ROLES = ["kernel_c", "bias_c", "gamma", "beta", "mean", "var", "kernel_d", "bias_d"]


@pytest.mark.parametrize("fixture", ["cnn.keras", "cnn.weights.h5", "cnn.h5"])
def test_keras_cnn_in_pytorch_gives_keras_outputs(fixture: str, tmp_path: Path) -> None:
    x = torch.from_numpy(EXPECTED["x"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
    expected = torch.from_numpy(EXPECTED["y"])
    with keras.open_keras(_copy(fixture, tmp_path)) as r:
        order = LEGACY_ORDER if r.layout == "legacy" else list(KERAS3_NAMES)
        names = dict(zip(ROLES, order, strict=True))
        # Through savegame.adapters.mapping, reading straight from the reader.
        model = _torch_cnn()
        mappings = (
            mapping.conv2d("0", kernel=names["kernel_c"], bias=names["bias_c"])
            + mapping.batch_norm(
                "1",
                gamma=names["gamma"],
                beta=names["beta"],
                moving_mean=names["mean"],
                moving_variance=names["var"],
            )
            + mapping.dense(
                "4", kernel=names["kernel_d"], bias=names["bias_d"], flatten_from=(4, 6, 6)
            )
        )
        unwritten = mapping.apply_mappings(model, mappings, r)
        assert unwritten == ["1.num_batches_tracked"]
        w = {k: r.read(v) for k, v in names.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    # The same with the conversions written out by hand (independent of mapping.py).
    manual = _torch_cnn()
    _load_into_torch(manual, w)
    with torch.no_grad():
        torch.testing.assert_close(manual(x), expected, rtol=0, atol=1e-5)
        # A Dense taken in plain (in, out) -> (out, in) order would not match: the flatten
        # reordering is necessary, so this test can tell.
        manual[4].weight.copy_(w["kernel_d"].T)
        assert not torch.allclose(manual(x), expected, atol=1e-3)


def test_scalar_variables_keep_their_rank(tmp_path: Path) -> None:
    with keras.open_keras(_copy("cnn.weights.h5", tmp_path)) as r:
        assert r.info("optimizer/vars/0").shape == ()
        iteration = r.read("optimizer/vars/0")
        assert iteration.shape == () and iteration.dtype == torch.int32


def test_missing_h5py_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _copy("cnn.h5", tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(errors.MissingDependencyError, match=r"savegame\[keras\]"):
        keras.open_keras(path)
