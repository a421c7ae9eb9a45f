"""Conversion keeps names, dtypes and values exactly; writes are atomic and never clobber."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from savegame import errors
from savegame.interop import convert, detect


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def _flat_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {
        "layer.0.weight": torch.randn(3, 4),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "fp8": torch.randn(4).to(torch.float8_e4m3fn),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "c64": torch.randn(2, dtype=torch.complex64),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 2),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }


def _assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(_bits(got[k]), _bits(t)), k


@pytest.mark.parametrize("src_kind", ["torch", "torch-legacy", "safetensors"])
@pytest.mark.parametrize("to", ["safetensors", "torch"])
def test_convert_is_exact(tmp_path: Path, src_kind: str, to: str) -> None:
    tensors = _flat_tensors()
    src = tmp_path / "src.bin"
    if src_kind == "safetensors":
        save_file(tensors, src)
    else:
        if src_kind == "torch-legacy":
            tensors = {k: v for k, v in tensors.items() if k not in ("fp8", "u16")}
        torch.save(tensors, src, _use_new_zipfile_serialization=src_kind == "torch")
    dst = tmp_path / "out" / "dst.bin"
    assert convert.convert(src, dst, to=to) == dst  # type: ignore[arg-type]
    got = load_file(dst) if to == "safetensors" else torch.load(dst, weights_only=True)
    _assert_exact(got, tensors)
    assert detect.detect(dst) == to
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]  # no temp files left


def test_convert_numpy_to_safetensors_keeps_values(tmp_path: Path) -> None:
    src = tmp_path / "a.npz"
    arrays = {"a": np.arange(6, dtype=">f4").reshape(2, 3), "f": np.asfortranarray(np.ones((2, 3)))}
    np.savez_compressed(src, **arrays)
    dst = tmp_path / "a.safetensors"
    convert.convert(src, dst, to="safetensors")
    got = load_file(dst)
    for k, a in arrays.items():
        assert np.array_equal(got[k].numpy(), a)


def test_existing_destination_is_kept_unless_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, src)
    dst = tmp_path / "b.pt"
    dst.write_bytes(b"precious")
    with pytest.raises(errors.StepExistsError) as ei:
        convert.convert(src, dst, to="torch")
    assert ei.value.path == str(dst)
    assert dst.read_bytes() == b"precious"
    convert.convert(src, dst, to="torch", overwrite=True)
    assert torch.equal(torch.load(dst, weights_only=True)["w"], torch.ones(2))


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2), "v": torch.zeros(3)}, src)
    dst = tmp_path / "out.safetensors"

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        convert.convert(src, dst, to="safetensors")
    assert list(tmp_path.iterdir()) == [src]


def test_unknown_target_rejected(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, src)
    with pytest.raises(errors.UnsupportedFormatError):
        convert.convert(src, tmp_path / "x", to="onnx")  # type: ignore[arg-type]


def test_convert_tutorial_checkpoint_to_savegame(tmp_path: Path) -> None:
    savegame = pytest.importorskip("savegame")
    if not hasattr(savegame, "save") or not hasattr(savegame, "load"):
        pytest.skip("savegame.save/load (core API, owned by the lead) not available yet")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    src = tmp_path / "ckpt.pth"
    torch.save(
        {
            "epoch": 5,
            "state_dict": model.state_dict(),
            "best_accuracy": 0.5,
            "optimizer": opt.state_dict(),
        },
        src,
    )
    dst = tmp_path / "sg"
    convert.convert(src, dst, to="savegame")
    assert detect.detect(dst) == "savegame"
    back = savegame.load(dst)
    assert back["epoch"] == 5 and back["best_accuracy"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(back["state_dict"][k], v)
    assert 0 in back["optimizer"]["state"]
    assert torch.equal(
        back["optimizer"]["state"][0]["momentum_buffer"],
        opt.state_dict()["state"][0]["momentum_buffer"],
    )
    with savegame.open(dst) as r:
        assert r.metadata()["step"] == 5
    # Round trip back to torch keeps every tensor bitwise.
    out = tmp_path / "again.pt"
    convert.convert(dst, out, to="torch")
    flat = torch.load(out, weights_only=True)
    assert torch.equal(flat["state_dict/weight"], model.state_dict()["weight"])
    with pytest.raises(errors.StepExistsError):
        convert.convert(src, dst, to="savegame")
    convert.convert(src, dst, to="savegame", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pt", "ckpt.pth", "sg"]
