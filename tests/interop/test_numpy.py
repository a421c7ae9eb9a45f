"""Round trips: files written by np.save / np.savez / np.savez_compressed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from savegame import errors
from savegame.interop import base
from savegame.interop import numpy as npr

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    "big_endian": np.arange(5, dtype=">i4"),
    "u16": np.array([0, 65535], dtype=np.uint16),
    "c128": np.array([1 + 2j, -3j]),
    "bool": np.array([True, False]),
    "empty": np.zeros((0, 3), dtype=np.float16),
    "scalar": np.array(7, dtype=np.int64),
}


def _same(got: torch.Tensor, want: np.ndarray) -> None:
    assert tuple(got.shape) == want.shape
    native = want.astype(want.dtype.newbyteorder("="))
    assert np.array_equal(got.numpy(), native)
    assert got.numpy().dtype == native.dtype


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_npy_round_trips(tmp_path: Path, name: str) -> None:
    p = tmp_path / f"{name}.npy"
    np.save(p, ARRAYS[name])
    with npr.open_numpy(p) as r:
        assert r.keys() == ["array"]
        got = r.read("array")
        assert isinstance(got, torch.Tensor)
        _same(got, np.load(p))
        assert r.metadata()["fortran_order"]["array"] == (name == "fortran")
        assert r.info("array").shape == ARRAYS[name].shape


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_round_trips(tmp_path: Path, save: object) -> None:
    p = tmp_path / "a.npz"
    save(p, **ARRAYS)  # type: ignore[operator]
    ref = np.load(p)
    with npr.open_numpy(p) as r:
        assert sorted(r.keys()) == sorted(ARRAYS)
        for k in ARRAYS:
            _same(r.read(k), ref[k])  # type: ignore[arg-type]
        assert r.verify() == []
        assert r.tree()["f32"] == base.TensorRef("f32")


def test_npy_v2_header(tmp_path: Path) -> None:
    p = tmp_path / "v2.npy"
    arr = np.arange(3, dtype=np.float32)
    with open(p, "wb") as f:
        np.lib.format.write_array(f, arr, version=(2, 0))
    assert p.read_bytes()[6] == 2
    with npr.open_numpy(p) as r:
        _same(r.read("array"), arr)  # type: ignore[arg-type]


def test_object_dtype_refused(tmp_path: Path) -> None:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(errors.UnsafeContentError) as ei:
        npr.open_numpy(p)
    assert ei.value.path == str(p)


def test_closed_reader_raises_reader_closed_error(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, w=np.ones(2, np.float32))
    r = npr.open_numpy(p)
    assert isinstance(r, base.Reader)
    with r:
        assert r.keys() == ["w"]
    r.close()  # idempotent
    for call in (
        r.keys,
        r.tree,
        r.metadata,
        r.verify,
        lambda: r.read("w"),
        lambda: r.read_numpy("w"),
    ):
        with pytest.raises(errors.ReaderClosedError):
            call()
