"""diff across formats: names added/removed, shape/dtype changes, max abs difference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from savegame.tools import diff


def test_diff_torch_vs_safetensors(tmp_path: Path) -> None:
    a = {
        "same": torch.arange(4.0),
        "moved": torch.zeros(3),
        "reshaped": torch.zeros(2, 3),
        "retyped": torch.zeros(2),
        "gone": torch.ones(1),
        "ints": torch.tensor([-(2**62), 5]),
        "nan": torch.tensor([float("nan"), 1.0]),
    }
    b = {
        "same": torch.arange(4.0),
        "moved": torch.tensor([0.0, 0.25, -1.5]),
        "reshaped": torch.zeros(3, 2),
        "retyped": torch.zeros(2, dtype=torch.float16),
        "new": torch.ones(1),
        "ints": torch.tensor([2**62, 5]),
        "nan": torch.tensor([float("nan"), 1.0]),
    }
    pa, pb = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(a, pa)
    save_file(b, pb)
    r = diff.diff(pa, pb)
    assert r.added == ["new"] and r.removed == ["gone"]
    assert set(r.changed) == {"reshaped", "retyped"}
    assert r.changed["reshaped"][0].shape == (2, 3) and r.changed["reshaped"][1].shape == (3, 2)
    assert r.max_abs_diff["same"] == 0.0 and r.max_abs_diff["moved"] == 1.5
    assert r.max_abs_diff["ints"] == float(2**63)  # exact: no int64 overflow
    assert r.max_abs_diff["nan"] == 0.0  # identical bits, NaN included
    assert sorted(r.identical) == ["nan", "same"]
    assert not r.equal


def test_diff_identical_files_is_equal(tmp_path: Path) -> None:
    t = {"w": torch.randn(3, 3), "b": torch.randn(3).bfloat16()}
    torch.save(t, tmp_path / "a.pt")
    save_file(t, tmp_path / "b.safetensors")
    r = diff.diff(tmp_path / "a.pt", tmp_path / "b.safetensors")
    assert r.equal and r.identical == ["b", "w"]


def test_diff_nan_versus_number(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.array([1.0, 2.0]))
    np.savez(tmp_path / "b.npz", x=np.array([1.0, np.nan]))
    r = diff.diff(tmp_path / "a.npz", tmp_path / "b.npz")
    assert math.isnan(r.max_abs_diff["x"]) and not r.equal


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn]
)
def test_diff_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    x = torch.tensor([0, 1, 1]).to(dtype)
    y = torch.tensor([1, 1, 0]).to(dtype)
    save_file({"t": x}, tmp_path / "a.safetensors")
    save_file({"t": y}, tmp_path / "b.safetensors")
    r = diff.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.max_abs_diff["t"] == 1.0
