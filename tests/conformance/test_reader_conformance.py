"""One reader contract, every format (STYLE.md §10.4; the docstring of
:class:`savegame.interop.base.Reader`).

Each case is a tiny file of one format, opened through ``savegame.open`` as a user would. The
suite asserts the same behaviour of all of them: the returned object is a
:class:`savegame.Reader` of the detected format; ``keys()`` lists something and ``info(k)``
agrees with ``read(k)`` on dtype and shape; an unknown name raises ``CheckpointNotFoundError``;
``tree()`` refers only to listed tensors; ``metadata()`` is JSON; ``verify()`` finds nothing
wrong in a good file; the reader is a context manager that returns itself and closes on exit;
``close()`` is idempotent; and every public method of a closed reader raises
:class:`savegame.ReaderClosedError`.

A new format opts in with one entry in ``CASES``: a builder that writes (or names) a good file.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.interop import base

TESTS = Path(__file__).resolve().parent.parent
FOREIGN = TESTS / "golden" / "foreign"
SAVEGAME_V1 = TESTS / "golden" / "savegame_v1" / "step-000000000007"


@dataclass(frozen=True)
class Case:
    """One good file of one format: ``build(folder)`` returns its path; ``options`` go to open."""

    format: str
    build: Callable[[Path], Path]
    options: dict[str, Any] = field(default_factory=dict)


def _golden(*parts: str) -> Callable[[Path], Path]:
    return lambda _tmp: FOREIGN.joinpath(*parts)


def _torch_zip(tmp: Path) -> Path:
    p = tmp / "zip.pt"
    torch.save(
        {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(3, dtype=torch.bfloat16),
            "n": 3,
        },
        p,
    )
    return p


def _npy(tmp: Path) -> Path:
    p = tmp / "a.npy"
    np.save(p, np.arange(12, dtype=np.int16).reshape(3, 4))
    return p


def _npz(tmp: Path) -> Path:
    p = tmp / "a.npz"
    np.savez(
        p, w=np.ones((2, 2), np.float32), b=np.arange(3, dtype=np.float64), flag=np.array(True)
    )
    return p


def _npz_compressed(tmp: Path) -> Path:
    p = tmp / "c.npz"
    np.savez_compressed(p, w=np.zeros((4, 4), np.float16), i=np.arange(5, dtype=np.int64))
    return p


def _safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    p = tmp / "m.safetensors"
    save_file(
        {
            "w": torch.randn(2, 3),
            "h": torch.ones(4, dtype=torch.float16),
            "u": torch.zeros(1, dtype=torch.uint8),
        },
        p,
    )
    return p


# A two-layer network: a 3x3 conv with batch norm (2 filters), then a 1x1 conv with bias (4).
_DARKNET_CFG = """[net]
width=8
height=8
channels=3

[convolutional]
batch_normalize=1
filters=2
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=4
activation=linear
"""


def _darknet(tmp: Path) -> Path:
    (tmp / "tiny.cfg").write_text(_DARKNET_CFG)
    floats = (2 + 3 * 2 + 2 * 3 * 3 * 3) + (4 + 4 * 2)  # bias, bn, weights; bias, weights
    p = tmp / "tiny.weights"
    values = np.random.default_rng(0).normal(size=floats).astype("<f4")
    p.write_bytes(struct.pack("<iiiQ", 0, 2, 5, 1000) + values.tobytes())
    return p


def _savegame_fresh(tmp: Path) -> Path:
    p = tmp / "step-000000000003"
    savegame.save(
        p, {"model": {"w": torch.randn(2, 2), "b": torch.zeros(2)}, "step": 3, "name": "x"}, step=3
    )
    return p


CASES: dict[str, Case] = {
    "torch-zip": Case("torch", _torch_zip),
    "torch-zip-golden": Case("torch", _golden("torch", "tutorial.pth")),
    "torch-legacy": Case("torch", _golden("torch", "legacy.pt")),
    "torch-export-golden": Case("torch-export", _golden("torch", "model.pt2")),
    "safetensors": Case("safetensors", _safetensors),
    "safetensors-golden": Case("safetensors", _golden("torch", "model.safetensors")),
    "numpy-npy": Case("numpy", _npy),
    "numpy-npz": Case("numpy", _npz),
    "numpy-npz-compressed": Case("numpy", _npz_compressed),
    "numpy-npz-golden": Case("numpy", _golden("torch", "arrays.npz")),
    "tensorflow-tf1": Case("tensorflow", _golden("tensorflow", "tf1")),
    "tensorflow-tfkeras": Case("tensorflow", _golden("tensorflow", "tfkeras", "ckpt-1")),
    "tensorflow-sharded": Case("tensorflow", _golden("tensorflow", "sharded", "ckpt")),
    "keras-h5-isolated": Case("keras-h5", _golden("keras", "cnn.h5")),
    "keras-h5-in-process": Case("keras-h5", _golden("keras", "cnn.h5"), {"isolate": False}),
    "keras-weights-h5": Case("keras-h5", _golden("keras", "cnn.weights.h5"), {"isolate": False}),
    "keras3-isolated": Case("keras3", _golden("keras", "cnn.keras")),
    "keras3-in-process": Case("keras3", _golden("keras", "cnn.keras"), {"isolate": False}),
    "darknet": Case("darknet", _darknet, {"cfg": "tiny.cfg"}),
    "savegame-golden-v1": Case("savegame", lambda _tmp: SAVEGAME_V1),
    "savegame-fresh": Case("savegame", _savegame_fresh),
}


@pytest.fixture(scope="module")
def _built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Files are built once per case for the whole module (each test opens its own reader)."""
    return {}


@pytest.fixture(params=sorted(CASES))
def case(
    request: pytest.FixtureRequest,
    _built: dict[str, tuple[Path, dict[str, Any]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path, dict[str, Any]]:
    name: str = request.param
    c = CASES[name]
    if name not in _built:
        folder = tmp_path_factory.mktemp(name)
        path = c.build(folder)
        # File-valued options (cfg=) are named relative to the folder the builder wrote to.
        options = {k: (folder / v if k == "cfg" else v) for k, v in c.options.items()}
        _built[name] = (path, options)
    path, options = _built[name]
    return c.format, path, options


@pytest.fixture()
def reader(case: tuple[str, Path, dict[str, Any]]) -> Iterator[savegame.Reader]:
    _fmt, path, options = case
    r = savegame.open(path, **options)
    yield r
    r.close()


def _dtype_and_shape(value: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(value, np.ndarray):  # string tensors (TensorFlow) come back as numpy bytes
        return ("string" if value.dtype.kind in "SUO" else value.dtype.name), tuple(value.shape)
    return str(value.dtype).removeprefix("torch."), tuple(value.shape)


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _leaves(v)
    else:
        yield node


def test_open_returns_a_reader_of_the_detected_format(
    case: tuple[str, Path, dict[str, Any]], reader: savegame.Reader
) -> None:
    fmt, _path, _options = case
    assert isinstance(reader, savegame.Reader)
    assert isinstance(reader, base.Reader)
    assert reader.format == fmt
    assert isinstance(reader.path, str) and reader.path
    assert reader.closed is False


def test_keys_are_listed_and_info_agrees_with_read(reader: savegame.Reader) -> None:
    keys = reader.keys()
    assert keys and all(isinstance(k, str) for k in keys)
    assert len(set(keys)) == len(keys)
    for k in keys:
        info = reader.info(k)
        assert isinstance(info, savegame.TensorInfo)
        assert info.name == k
        assert isinstance(info.shape, tuple) and isinstance(info.nbytes, int) and info.nbytes >= 0
        value = reader.read(k)
        if info.dtype != "string":  # numbers come back as CPU torch tensors
            assert isinstance(value, torch.Tensor) and value.device.type == "cpu", k
        assert _dtype_and_shape(value) == (info.dtype, info.shape), k


def test_unknown_name_is_checkpoint_not_found(reader: savegame.Reader) -> None:
    missing = "no/such/tensor-\u2603"
    assert missing not in reader.keys()
    with pytest.raises(savegame.CheckpointNotFoundError):
        reader.info(missing)
    with pytest.raises(savegame.CheckpointNotFoundError):
        reader.read(missing)


def test_tree_refers_only_to_listed_tensors(reader: savegame.Reader) -> None:
    tree = reader.tree()
    assert tree is not None
    keys = set(reader.keys())
    refs = [leaf.name for leaf in _leaves(tree) if isinstance(leaf, base.TensorRef)]
    assert refs, "the tree names no tensor"
    assert set(refs) <= keys, sorted(set(refs) - keys)


def test_metadata_is_json(reader: savegame.Reader) -> None:
    meta = reader.metadata()
    assert isinstance(meta, dict)
    json.dumps(meta)


def test_verify_finds_nothing_wrong_in_a_good_file(reader: savegame.Reader) -> None:
    assert reader.verify() == []


def test_context_manager_returns_the_reader_and_closes_it(
    case: tuple[str, Path, dict[str, Any]],
) -> None:
    _fmt, path, options = case
    r = savegame.open(path, **options)
    with r as entered:
        assert entered is r
        assert entered.keys()
    assert r.closed
    with pytest.raises(savegame.ReaderClosedError):
        r.keys()


def test_context_manager_closes_on_error(case: tuple[str, Path, dict[str, Any]]) -> None:
    _fmt, path, options = case
    with pytest.raises(RuntimeError, match="boom"), savegame.open(path, **options) as r:
        raise RuntimeError("boom")
    assert r.closed


def test_close_twice_is_fine(reader: savegame.Reader) -> None:
    reader.close()
    reader.close()
    assert reader.closed


def test_every_public_method_after_close_raises_reader_closed_error(
    reader: savegame.Reader,
) -> None:
    key = reader.keys()[0]
    reader.close()
    calls: dict[str, Callable[[], Any]] = {
        "keys": reader.keys,
        "info": lambda: reader.info(key),
        "read": lambda: reader.read(key),
        "tree": reader.tree,
        "metadata": reader.metadata,
        "verify": reader.verify,
        "__enter__": reader.__enter__,
    }
    for method, call in calls.items():
        with pytest.raises(savegame.ReaderClosedError) as ei:
            call()
        assert isinstance(ei.value, ValueError), method  # like I/O on a closed file
        assert ei.value.path == reader.path, method
    reader.close()  # still fine after failed calls


def test_a_copied_file_opens_the_same(
    case: tuple[str, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Detection goes by bytes, and nothing the reader keeps depends on where the file was."""
    fmt, path, options = case
    if path.is_dir() or fmt == "tensorflow":  # folders and TF bundles are several files
        pytest.skip("a file set, not one file")
    copy = tmp_path / "renamed.bin"
    shutil.copy(path, copy)
    with savegame.open(path, **options) as a, savegame.open(copy, **options) as b:
        assert b.format == a.format
        assert b.keys() == a.keys()
        assert [b.info(k) for k in b.keys()] == [a.info(k) for k in a.keys()]
