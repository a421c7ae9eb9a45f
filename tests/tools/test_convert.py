"""Conversion keeps names, dtypes and values exactly; writes are atomic and never clobber."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from savegame import errors
from savegame.interop import detect
from savegame.tools import convert


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


# ---- TF2 checkpoints: string tensors (issue 9.13) ------------------------------------------

TF_GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "tensorflow"


def _bundle_writer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tf_bundle_writer", TF_GOLDEN / "bundle_writer.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tf_strings(prefix: Path) -> dict[str, object]:
    from savegame.interop import tensorflow

    with tensorflow.open_tensorflow(prefix) as r:
        return {k: r.read_strings(k) for k in r.keys() if r.info(k).dtype == "string"}


def _tf_numbers(prefix: Path) -> dict[str, torch.Tensor]:
    from savegame.interop import tensorflow

    with tensorflow.open_tensorflow(prefix) as r:
        out = {}
        for k in r.keys():
            if r.info(k).dtype != "string":
                t = r.read(k)
                assert isinstance(t, torch.Tensor)
                out[k] = t
        return out


@pytest.mark.parametrize(
    "fixture", ["keras3/ckpt-1", "tfkeras/ckpt-1", "sharded/ckpt", "tf1/model.ckpt-3"]
)
def test_tf_checkpoint_converts_to_safetensors_leaving_out_strings_by_name(
    tmp_path: Path, fixture: str
) -> None:
    src = TF_GOLDEN / fixture
    strings, numbers = _tf_strings(src), _tf_numbers(src)
    assert strings  # every fixture holds a string tensor (TF2: the object graph)
    dst = tmp_path / "out.safetensors"
    with pytest.warns(errors.LossyConversionWarning, match="left out") as rec:
        assert convert.convert(src, dst, to="safetensors") == dst
    (warning,) = [w.message for w in rec]
    assert isinstance(warning, errors.LossyConversionWarning)
    assert set(warning.left_out) == set(strings)
    assert all("safetensors holds only numeric tensors" in why for why in warning.left_out.values())
    _assert_exact(load_file(dst), numbers)


@pytest.mark.parametrize("fixture", ["keras3/ckpt-1", "tf1/model.ckpt-3"])
def test_tf_checkpoint_converts_to_torch_and_savegame_keeping_strings(
    tmp_path: Path, fixture: str
) -> None:
    import savegame as sg

    src = TF_GOLDEN / fixture
    strings, numbers = _tf_strings(src), _tf_numbers(src)
    if fixture.startswith("keras3"):
        assert "_CHECKPOINTABLE_OBJECT_GRAPH" in strings
        assert b"" in strings["extra/strings/.ATTRIBUTES/VARIABLE_VALUE"]  # type: ignore[operator]
    convert.convert(src, tmp_path / "out.pt", to="torch")
    flat = torch.load(tmp_path / "out.pt", weights_only=True)  # strings load weights-only too
    convert.convert(src, tmp_path / "out-sg", to="savegame")
    tree = sg.load(tmp_path / "out-sg")
    for got in (flat, tree):
        assert sorted(got) == sorted([*strings, *numbers])
        _assert_exact({k: got[k] for k in numbers}, numbers)
        for k, want in strings.items():
            assert got[k] == want, k  # bytes / nested lists of bytes, trailing NULs kept


def test_checkpoint_of_only_strings_cannot_become_safetensors(tmp_path: Path) -> None:
    _bundle_writer().write_bundle(tmp_path / "ckpt", {"names": [b"a", b"b"], "title": b"x"})
    dst = tmp_path / "new" / "out.safetensors"
    with pytest.raises(errors.UnsupportedFormatError, match="every tensor is a string") as ei:
        convert.convert(tmp_path / "ckpt", dst, to="safetensors")
    assert "'torch' or 'savegame'" in str(ei.value)
    assert not (tmp_path / "new").exists()  # the folder created for dst is removed again
    convert.convert(tmp_path / "ckpt", tmp_path / "out.pt", to="torch")
    assert torch.load(tmp_path / "out.pt", weights_only=True) == {
        "names": [b"a", b"b"],
        "title": b"x",
    }


def test_tf_checkpoint_named_by_its_data_shard_converts(tmp_path: Path) -> None:
    src = TF_GOLDEN / "tf1" / "model.ckpt-3.data-00000-of-00001"
    convert.convert(src, tmp_path / "out.pt", to="torch")
    flat = torch.load(tmp_path / "out.pt", weights_only=True)
    numbers = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    _assert_exact(numbers, _tf_numbers(TF_GOLDEN / "tf1" / "model.ckpt-3"))


# ---- failed conversions clean up after themselves (issue 9.16) -----------------------------


@pytest.mark.parametrize("to", ["safetensors", "torch", "savegame"])
def test_failed_conversion_removes_only_the_folders_it_created(tmp_path: Path, to: str) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # header length past the end
    existing = tmp_path / "existing"
    existing.mkdir()
    dst = existing / "a" / "b" / "out"
    with pytest.raises(errors.FormatError, match="runs past the end"):
        convert.convert(bad, dst, to=to)  # type: ignore[arg-type]
    assert list(existing.iterdir()) == []  # a/ and a/b/ were created, then removed
    assert existing.is_dir()  # it was there before: kept


def test_failed_conversion_keeps_a_created_folder_that_someone_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, src)
    dst = tmp_path / "new" / "out.safetensors"

    def boom(*a: object, **k: object) -> None:
        (tmp_path / "new" / "other-file").write_text("not ours")
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        convert.convert(src, dst, to="safetensors")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["other-file"]


def test_materialize_reads_every_ref_and_keeps_everything_else(tmp_path: Path) -> None:
    from savegame.interop import base

    p = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2), "b": torch.zeros(1)}, p)
    opaque = base.Opaque("m", "C")
    tree = {"x": [base.TensorRef("w"), (base.TensorRef("b"), 3)], "o": opaque, "n": None}
    with detect.open(p) as r:
        got = base.materialize(tree, r)
        assert torch.equal(got["x"][0], torch.ones(2)) and torch.equal(
            got["x"][1][0], torch.zeros(1)
        )
        assert got["x"][1][1] == 3 and got["o"] is opaque and got["n"] is None
        assert base.materialize(tree, r, read=lambda name: name)["x"] == ["w", ("b", 3)]
