"""Outside review (s15): safetensors and numpy files as Hugging Face, safetensors and numpy write
them, read by savegame and compared with the library's own loader; plus diff on those files.

docs/formats.md: safetensors "Every dtype of FORMATS.md §2 torch can hold", "__metadata__ is
returned by metadata()", "Empty and 0-d tensors"; numpy "C and Fortran order (Fortran arrays
come back with the right values in C order); big-endian arrays are converted to native order;
read returns torch tensors, or numpy arrays for dtypes torch lacks (strings, datetimes)";
"Structured dtypes -> UnsupportedFormatError"; ".npy header <= 10,000 bytes"; detection: anything
else "raises UnsupportedFormatError naming the path and listing the supported formats".
diff: "Integer differences are exact (no overflow), NaNs with equal bits count as identical."
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

import savegame as sg
from savegame import errors
from savegame.cli.main import main


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def test_a_mixed_dtype_file_whose_offsets_are_not_in_name_order_reads_like_load_file(
    tmp_path: Path,
) -> None:
    """safetensors sorts data by alignment, then name: header order != offset order."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "z.a": torch.randn(3, generator=g).half(),
        "a.b": torch.randn(5, 2, generator=g).double(),
        "m": torch.arange(7, dtype=torch.int8),
        "b": torch.randn(2, generator=g).bfloat16(),
        "e": torch.zeros(0),
        "s": torch.tensor(1.0),
        "c": torch.randn(2, dtype=torch.complex64, generator=g),
        "u": torch.arange(3).to(torch.uint32),
        "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    by_offset = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    assert by_offset != sorted(tensors)  # the premise: data order is not name order
    ref = load_file(path)
    with sg.open(path) as r:
        assert sorted(r.keys()) == sorted(ref)
        assert r.metadata()["__metadata__"] == {"format": "pt", "note": "x"}
        for k, want in ref.items():
            got = r.read(k)
            assert (got.dtype, got.shape) == (want.dtype, want.shape), k
            assert torch.equal(_bits(got), _bits(want)), k


def test_tied_weights_saved_by_save_model_are_one_tensor_with_the_alias_in_metadata(
    tmp_path: Path,
) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(4, 3)
            self.head = torch.nn.Linear(3, 4, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    with sg.open(path) as r:
        assert r.keys() == ["emb.weight"]
        assert r.metadata()["__metadata__"] == {"head.weight": "emb.weight"}
        assert torch.equal(r.read("emb.weight"), model.emb.weight.detach())


def test_a_sharded_hf_checkpoint_index_and_model_folder_are_refused_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``model.safetensors.index.json`` + shards (what save_pretrained writes for big models) is
    not a format savegame lists; the promise is a typed refusal, exit 2, no traceback. The
    shards themselves open one by one."""
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(
        {"embed.weight": torch.ones(2, 2)},
        folder / "model-00001-of-00002.safetensors",
        metadata={"format": "pt"},
    )
    save_file(
        {"lm_head.weight": torch.zeros(2, 2)},
        folder / "model-00002-of-00002.safetensors",
        metadata={"format": "pt"},
    )
    index = folder / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": {"total_size": 32},
                "weight_map": {
                    "embed.weight": "model-00001-of-00002.safetensors",
                    "lm_head.weight": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    (folder / "config.json").write_text("{}")
    for target in (index, folder):
        with pytest.raises(errors.UnsupportedFormatError) as e:
            sg.open(target)
        assert e.value.path is not None and "safetensors" in str(e.value)
        capsys.readouterr()
        assert main(["show", str(target)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(target.name) in err
    with sg.open(folder / "model-00002-of-00002.safetensors") as r:
        assert r.keys() == ["lm_head.weight"]


# ---------------------------------------------------------------- numpy as numpy writes it

rng = np.random.default_rng(15)
ARRAYS = {
    "fortran": np.asfortranarray(rng.standard_normal((3, 4, 5)).astype("f4")),
    "fortran_big_endian": np.asfortranarray(rng.standard_normal((3, 4))).astype(">f8"),
    "big_endian_i4": np.arange(12, dtype=">i4").reshape(3, 4),
    "big_endian_c8": (rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype(">c8"),
    "big_endian_u2": np.arange(5, dtype=">u2"),
    "big_endian_f2": np.arange(5, dtype=">f2"),
    "u8_extremes": np.array([2**64 - 1, 0], dtype="u8"),
    "scalar": np.array(3.25),
    "bool": np.array([True, False]),
    "empty": np.zeros((0, 3), "f4"),
    "fortran_empty": np.asfortranarray(np.zeros((2, 0, 3))),
    "strided_view": rng.standard_normal((4, 6))[:, ::2],
    "unicode": np.array(["ab", "c"]),
    "datetime": np.array(["2020-01-01"], dtype="datetime64[D]"),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_npy_reads_the_values_np_load_gives(tmp_path: Path, name: str) -> None:
    a = ARRAYS[name]
    path = tmp_path / f"{name}.npy"
    np.save(path, a)
    with sg.open(path) as r:
        assert r.keys() == ["array"]
        got = r.read("array")
        info = r.info("array")
    got_np = got.numpy() if isinstance(got, torch.Tensor) else got
    assert isinstance(got, torch.Tensor) == (a.dtype.kind not in "UM")
    assert got_np.shape == a.shape == tuple(info.shape)
    assert got_np.dtype == a.dtype.newbyteorder("=")
    assert np.array_equal(got_np, a)


@pytest.mark.parametrize(
    "writer", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"]
)
def test_npz_reads_every_member_like_np_load_and_converts_bit_exact(tmp_path: Path, writer) -> None:
    numeric = {k: a for k, a in ARRAYS.items() if a.dtype.kind not in "UM"}
    src = tmp_path / "arrays.npz"
    writer(src, **numeric)
    ref = np.load(src)
    with sg.open(src) as r:
        assert sorted(r.keys()) == sorted(ref.files)
        for k in ref.files:
            assert np.array_equal(r.read(k).numpy(), ref[k]), k
    dst = tmp_path / "arrays.safetensors"
    sg.convert(src, dst, to="safetensors")
    assert sg.diff(src, dst).equal


def test_npz_member_names_that_look_like_paths_stay_names_and_nothing_is_written_outside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An .npz whose members are '../../evil.npy', '/abs.npy', 'a\\b.npy': savegame never
    extracts, so these are names; convert keeps them and writes only the destination."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    src = work / "trav.npz"
    with zipfile.ZipFile(src, "w") as z:
        for i, member in enumerate(("../../evil.npy", "/abs.npy", "a\\b.npy")):
            with z.open(member, "w") as f:
                np.save(f, np.full(2, float(i)))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for to in ("savegame", "safetensors", "torch"):
        dst = work / f"out-{to}"
        assert main(["convert", str(src), str(dst), "--to", to]) == 0
        assert main(["diff", str(src), str(dst)]) == 0
        with sg.open(dst) as r:
            assert sorted(r.keys()) == sorted(["../../evil", "/abs", "a\\b"])
            assert r.read("../../evil").tolist() == [0.0, 0.0]
    outputs = [Path(f"a/b/out-{to}") for to in ("savegame", "safetensors", "torch")]
    new = [
        p for p in sorted(q.relative_to(tmp_path) for q in tmp_path.rglob("*")) if p not in before
    ]
    assert new and all(any(p.is_relative_to(o) for o in outputs) for p in new), new
    assert not Path("/abs").exists() and not Path("/abs.npy").exists()
    capsys.readouterr()


def test_structured_dtype_is_unsupported_and_object_dtype_is_unsafe(tmp_path: Path) -> None:
    s = tmp_path / "s.npy"
    np.save(s, np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
    with pytest.raises(errors.UnsupportedFormatError, match="structured") as e:
        sg.open(s).read("array")
    assert e.value.path is not None
    o = tmp_path / "o.npy"
    np.save(o, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(errors.UnsafeContentError):
        sg.open(o)


@pytest.mark.parametrize("version,length", [(1, 65535), (2, 2**32 - 1), (3, 2**31)])
def test_a_huge_declared_npy_header_is_refused_without_reading_it(
    tmp_path: Path, version: int, length: int
) -> None:
    path = tmp_path / "h.npy"
    fmt = "<H" if version == 1 else "<I"
    path.write_bytes(
        b"\x93NUMPY" + bytes([version, 0]) + struct.pack(fmt, length) + b"{" + b" " * 64
    )
    with pytest.raises(errors.FormatError, match="10000-byte limit") as e:
        sg.open(path)
    assert e.value.path is not None


# ---------------------------------------------------------------- diff on these files


def test_diff_of_extreme_integers_is_exact_across_formats(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(
        {
            "u64": torch.tensor([2**64 - 1, 0], dtype=torch.uint64),
            "i64": torch.tensor([2**63 - 1, -(2**63)]),
            "u16": torch.tensor([65535]).to(torch.uint16),
        },
        a,
    )
    save_file(
        {
            "u64": torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
            "i64": torch.tensor([-(2**63), 2**63 - 1]),
            "u16": torch.tensor([0]).to(torch.uint16),
        },
        b,
    )
    d = sg.diff(a, b)
    assert d.max_abs_diff == {"u64": 2**64 - 1, "i64": 2**64 - 1, "u16": 65535}  # exact ints
    assert not d.equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64], ids=str)
def test_diff_max_abs_ignores_a_nan_both_files_hold_at_the_same_place(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.tensor([math.nan, 1.0, 5.0]).to(dtype)}, a)
    save_file({"w": torch.tensor([math.nan, 1.0, 5.5]).to(dtype)}, b)
    d = sg.diff(a, b)
    assert not d.equal
    assert d.max_abs_diff["w"] == pytest.approx(0.5), d.max_abs_diff


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _with_signature_at_512(data_start: int, size: int = 4096) -> bytes:
    """Payload bytes that put the HDF5 signature at file offsets 512, 1024 and 2048."""
    b = bytearray(size)
    for off in (512, 1024, 2048):
        b[off - data_start : off - data_start + 8] = HDF5_SIGNATURE
    return bytes(b)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_valid_file_whose_data_holds_the_hdf5_signature_is_still_read(
    tmp_path: Path, fmt: str
) -> None:
    if fmt == "npy":
        path = tmp_path / "blob.npy"
        np.save(path, np.zeros(4096, np.uint8))
        start = path.stat().st_size - 4096
        payload = _with_signature_at_512(start)
        np.save(path, np.frombuffer(payload, np.uint8))
    else:
        path = tmp_path / "blob.safetensors"
        save_file({"blob": torch.zeros(4096, dtype=torch.uint8)}, path)
        start = path.stat().st_size - 4096
        payload = _with_signature_at_512(start)
        save_file({"blob": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, path)
    assert path.read_bytes()[512:520] == HDF5_SIGNATURE  # the premise
    with sg.open(path) as r:
        (name,) = r.keys()
        assert r.read(name).numpy().tobytes() == payload


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_sub_byte_float_entries_are_listed_and_convert_refuses_them_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/formats.md: "F4/F6 entries are listed (info) but read raises
    UnsupportedFormatError"; convert: "Tensors that the target cannot hold (..., F4) raise
    UnsupportedFormatError"."""
    src = _raw_safetensors(
        tmp_path / "fp4.safetensors",
        {
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "q": {"dtype": "F4", "shape": [4], "data_offsets": [8, 10]},
            "s": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [10, 13]},
        },
        bytes(13),
    )
    with sg.open(src) as r:
        assert r.keys() == ["w", "q", "s"]
        assert (r.info("q").nbytes, tuple(r.info("q").shape)) == (2, (4,))
        assert r.read("w").tolist() == [0.0, 0.0]
        with pytest.raises(errors.UnsupportedFormatError, match="'q'"):
            r.read("q")
    assert main(["show", str(src)]) == 0
    out = capsys.readouterr().out
    assert "q: f4[4] 2 B" in out and "s: f6_e2m3[4] 3 B" in out
    for to in ("safetensors", "torch", "savegame"):
        dst = tmp_path / f"out-{to}"
        assert main(["convert", str(src), str(dst), "--to", to]) == 2
        assert "'q'" in capsys.readouterr().err
        assert not dst.exists()
