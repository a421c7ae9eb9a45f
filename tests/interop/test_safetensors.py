"""Round trips: files written by safetensors.torch.save_file, read by our strict reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from savegame import errors
from savegame.interop import base
from savegame.interop import safetensors as st


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "model.embed.weight": torch.randn(5, 3),
        "bf16": torch.randn(4, dtype=torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(3, dtype=torch.float64),
        "fp8": torch.randn(6).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(6).to(torch.float8_e5m2),
        "u16": torch.tensor([0, 7, 65535], dtype=torch.uint16),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.0),
        "i8": torch.tensor([-1, 1], dtype=torch.int8),
    }


def _raw_file(path: Path, header: dict[str, object] | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_all_dtypes_round_trip_bitwise(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    tensors = _tensors()
    save_file(tensors, p, metadata={"format": "pt", "note": "x"})
    ref = load_file(p)
    with st.open_safetensors(p) as r:
        assert sorted(r.keys()) == sorted(tensors)
        assert r.format == "safetensors"
        assert r.metadata() == {"__metadata__": {"format": "pt", "note": "x"}}
        for name, t in ref.items():
            got = r.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            if t.numel():
                assert torch.equal(
                    got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
                ), name
        assert r.info("model.embed.weight") == base.TensorInfo(
            "model.embed.weight", "float32", (5, 3), 60
        )
        assert r.tree()["bf16"] == base.TensorRef("bf16")
        assert r.verify() == []


def test_read_touches_only_the_tensor_range(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"big": torch.zeros(100_000), "small": torch.ones(2)}, p)
    with st.open_safetensors(p) as r:
        real = r._f
        sizes: list[int] = []

        class Spy:
            def read(self, n: int = -1) -> bytes:
                sizes.append(n)
                return real.read(n)

            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

        r._f = Spy()  # type: ignore[assignment]
        assert torch.equal(r.read("small"), torch.ones(2))
        assert sizes == [8]


def test_duplicate_names_rejected_although_json_keeps_the_last(tmp_path: Path) -> None:
    hdr = (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    )
    p = _raw_file(tmp_path / "dup.safetensors", hdr, b"\0" * 4)
    with pytest.raises(errors.FormatError) as ei:
        st.open_safetensors(p)
    assert ei.value.key == "a" and ei.value.path == str(p)


def test_leading_space_and_extra_fields_rejected(tmp_path: Path) -> None:
    ok = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    p = _raw_file(tmp_path / "sp.safetensors", b" " + json.dumps(ok).encode(), b"\0" * 4)
    with pytest.raises(errors.FormatError):
        st.open_safetensors(p)
    extra = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}
    p = _raw_file(tmp_path / "ex.safetensors", extra, b"\0" * 4)
    with pytest.raises(errors.FormatError):
        st.open_safetensors(p)


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errors.CheckpointNotFoundError):
        st.open_safetensors(tmp_path / "nope.safetensors")


def test_closed_reader_raises_reader_closed_error(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, p)
    r = st.open_safetensors(p)
    assert isinstance(r, base.Reader)
    with r:
        assert r.keys() == ["w"]
    r.close()  # idempotent
    assert r.closed
    for call in (r.keys, r.tree, r.metadata, r.verify, lambda: r.read("w"), lambda: r.info("w")):
        with pytest.raises(errors.ReaderClosedError):
            call()


def test_dtype_table_is_the_one_in_format_tensors() -> None:
    from savegame.format import tensors

    assert st.DTYPES is tensors.SAFETENSORS_DTYPES
    for code, (name, bits) in st.DTYPES.items():
        if name is not None:
            assert tensors.TO_SAFETENSORS[name] == code
            assert tensors.DTYPES[name][:2] == (code, bits // 8)
