"""Format detection from bytes (not names) and dispatch to the right reader."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from savegame import errors
from savegame.interop import detect

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "foreign"


def test_torch_safetensors_numpy_detected_from_bytes_not_names(tmp_path: Path) -> None:
    # Misleading names on purpose: detection must look at the bytes.
    torch.save({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "b.npy", _use_new_zipfile_serialization=False)
    save_file({"w": torch.ones(2)}, tmp_path / "c.pt")
    np.save(tmp_path / "d.npy", np.ones(2))
    shutil.move(tmp_path / "d.npy", tmp_path / "d.bin")
    np.savez(tmp_path / "e.npz", w=np.ones(2))
    shutil.move(tmp_path / "e.npz", tmp_path / "e.pt")
    expected = {
        "a.safetensors": "torch",
        "b.npy": "torch",
        "c.pt": "safetensors",
        "d.bin": "numpy",
        "e.pt": "numpy",
    }
    for name, fmt in expected.items():
        assert detect.detect(tmp_path / name) == fmt, name
        with detect.open(tmp_path / name) as r:
            assert r.format == fmt
            assert r.keys() in (["w"], ["array"])
            assert torch.equal(
                torch.as_tensor(r.read(r.keys()[0])).double(), torch.ones(2, dtype=torch.float64)
            )


def test_torchscript_refused(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    assert detect.detect(p) == "torchscript"
    with pytest.raises(errors.UnsupportedFormatError, match="TorchScript") as ei:
        detect.open(p)
    assert ei.value.path == str(p)


def test_keras_and_hdf5_detected(tmp_path: Path) -> None:
    assert detect.detect(GOLDEN / "keras" / "cnn.keras") == "keras3"
    assert detect.detect(GOLDEN / "keras" / "cnn.h5") == "keras-h5"
    assert detect.detect(GOLDEN / "keras" / "cnn.weights.h5") == "keras-h5"
    shutil.copy(GOLDEN / "keras" / "cnn.weights.h5", tmp_path / "noname")
    assert detect.detect(tmp_path / "noname") == "keras-h5"


def test_hdf5_magic_at_512_detected(tmp_path: Path) -> None:
    p = tmp_path / "userblock"
    p.write_bytes(b"\0" * 512 + detect.HDF5_MAGIC + b"\0" * 100)
    assert detect.detect(p) == "keras-h5"


def test_tensorflow_prefix_index_and_folder(tmp_path: Path) -> None:
    d = GOLDEN / "tensorflow" / "tf1"
    assert detect.detect(d) == "tensorflow"
    assert detect.detect(d / "model.ckpt-3.index") == "tensorflow"
    assert detect.detect(d / "model.ckpt-3") == "tensorflow"
    with detect.open(d / "model.ckpt-3") as r:
        assert r.format == "tensorflow" and r.keys()


def test_darknet_needs_cfg(tmp_path: Path) -> None:
    p = tmp_path / "yolo.weights"
    p.write_bytes(
        np.array([0, 2, 5], dtype="<i4").tobytes() + b"\0" * 8 + np.ones(10, "<f4").tobytes()
    )
    assert detect.detect(p) == "darknet"
    with pytest.raises(errors.UnsupportedFormatError, match="cfg=") as ei:
        detect.open(p)
    assert ei.value.path == str(p)
    # With cfg= the Darknet reader takes over; a file shorter than its cfg opens only when
    # that is said explicitly (issue 9.15: backbones are partial on purpose, cut files are not).
    cfg = GOLDEN / "darknet" / "yolov3-tiny-small.cfg"
    with pytest.raises(errors.FormatError, match="holds 0 of the 13 layers"):
        detect.open(p, cfg=cfg)
    with detect.open(p, cfg=cfg, partial=True) as r:
        assert r.format == "darknet"
        assert str(r.coverage) == "0 of 13 layers present"
    # partial= is a darknet option: other readers ignore it, like cfg=.
    with detect.open(GOLDEN / "tensorflow" / "tf1", partial=True) as r:
        assert r.format == "tensorflow"


def test_savegame_folder_detected_and_redirected(tmp_path: Path) -> None:
    d = tmp_path / "step"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    assert detect.detect(d) == "savegame"
    with pytest.raises(errors.UnsupportedFormatError, match="savegame.open"):
        detect.open(d)


def test_unknown_lists_supported_formats(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(errors.UnsupportedFormatError, match="safetensors") as ei:
        detect.detect(p)
    assert ei.value.path == str(p)
    with pytest.raises(errors.CheckpointNotFoundError):
        detect.detect(tmp_path / "missing")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(errors.UnsupportedFormatError):
        detect.detect(empty_dir)


def test_zip_with_unrelated_members_is_unknown(tmp_path: Path) -> None:
    p = tmp_path / "x.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(errors.UnsupportedFormatError):
        detect.detect(p)


def test_missing_reader_module_is_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(1)}, p)
    # FORMATS is read-only; the registry behind it is what register_format(clobber=True) edits.
    monkeypatch.setitem(
        detect._REGISTRY, "safetensors", ("savegame.interop._no_such_reader", "open_x")
    )
    monkeypatch.delitem(sys.modules, "savegame.interop._no_such_reader", raising=False)
    with pytest.raises(errors.UnsupportedFormatError, match="missing"):
        detect.open(p)


def test_listing_option_reaches_torch_and_is_ignored_elsewhere(tmp_path: Path) -> None:
    p = tmp_path / "mod.pt"
    torch.save(torch.nn.Linear(2, 2), p)
    with pytest.raises(errors.UnsafeContentError):
        detect.open(p)
    with detect.open(p, listing=True) as r:
        assert r.keys()
    s = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(1)}, s)
    with detect.open(s, listing=True) as r:
        assert r.keys() == ["w"]


def test_tensorflow_checkpoint_named_by_its_data_shard(tmp_path: Path) -> None:
    # Issue 9.14: the shard path used to be "unrecognised"; prefix and .index worked.
    d = GOLDEN / "tensorflow"
    for shard, prefix in (
        (d / "tf1" / "model.ckpt-3.data-00000-of-00001", d / "tf1" / "model.ckpt-3"),
        (d / "sharded" / "ckpt.data-00002-of-00004", d / "sharded" / "ckpt"),
    ):
        assert detect.detect(shard) == "tensorflow"
        with detect.open(shard) as r, detect.open(prefix) as want:
            assert r.path == str(prefix)
            assert r.keys() == want.keys()
    # A file that merely looks like a shard name, with no .index beside it, is not TF.
    fake = tmp_path / "x.data-00000-of-00001"
    fake.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(errors.UnsupportedFormatError):
        detect.detect(fake)


@pytest.mark.parametrize(
    "name", ["m.pt", "m.safetensors", "m.npy", "m.h5", "m.keras", "m.index", "m.weights", "m"]
)
def test_empty_file_says_it_is_empty(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"")
    options = {"cfg": GOLDEN / "darknet" / "yolov3-tiny.cfg"} if name.endswith(".weights") else {}
    for call in (lambda: detect.detect(p), lambda: detect.open(p, **options)):
        with pytest.raises(errors.FormatError, match=r"is empty \(0 bytes\)") as ei:
            call()
        assert ei.value.path == str(p)


def test_empty_tensorflow_index_behind_a_prefix_says_it_is_empty(tmp_path: Path) -> None:
    (tmp_path / "ckpt.index").write_bytes(b"")
    with pytest.raises(errors.FormatError, match=r"empty \(0 bytes\)"):
        detect.open(tmp_path / "ckpt")


def test_safetensors_header_length_past_the_end_says_so(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4)}, good)
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in (9, 20, header_end - 1):
        p = tmp_path / f"cut{cut}.bin"
        p.write_bytes(data[:cut])
        with pytest.raises(
            errors.FormatError, match=r"header length \d+ runs past the end of the \d+-byte file"
        ) as ei:
            detect.open(p)
        assert ei.value.path == str(p)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(data[:8])  # the length alone: too short to tell
    with pytest.raises(errors.UnsupportedFormatError, match="only 8 bytes"):
        detect.detect(tiny)
